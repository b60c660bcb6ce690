"""LiteRT's CompiledModel API: the runtime newer apps load models with."""

from __future__ import annotations

import os

import numpy as np

from delegates import temp_files


def run_compiled(model_content: bytes, signature: str,
                 inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Runs one signature with `ai_edge_litert.compiled_model.CompiledModel` (CPU).

    Args:
      model_content: the .tflite bytes.
      signature: signature key.
      inputs: input name -> array.

    Returns:
      Output name -> array (float32, shaped as the signature declares).
    """
    from ai_edge_litert import compiled_model  # pylint: disable=import-outside-toplevel

    path = temp_files.model_file(model_content)
    try:
        model = compiled_model.CompiledModel.from_file(path)
        out_details = model.get_output_tensor_details(signature)
        in_buffers = {}
        for name, value in inputs.items():
            in_buffers[name] = model.create_input_buffer_by_name(signature, name)
            in_buffers[name].write(np.ascontiguousarray(value, np.float32).reshape(-1))
        out_buffers = {name: model.create_output_buffer_by_name(signature, name)
                       for name in out_details}
        model.run_by_name(signature, in_buffers, out_buffers)
        results = {}
        for name, buf in out_buffers.items():
            shape = tuple(out_details[name]["shape"])
            results[name] = buf.read(int(np.prod(shape)), np.float32).reshape(shape)
        return results
    finally:
        os.remove(path)
