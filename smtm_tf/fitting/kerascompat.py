"""Tells Keras 3 and tf_keras models apart, so each is handled with its own API."""

from __future__ import annotations

import os
import types
import zipfile


def flavour_of(model) -> str | None:
    """Returns "keras" (Keras 3), "tf_keras", or None for a non-Keras object."""
    import keras  # pylint: disable=import-outside-toplevel
    if isinstance(model, keras.Model):
        return "keras"
    try:
        import tf_keras  # pylint: disable=import-outside-toplevel
    except ImportError:
        return None
    if isinstance(model, tf_keras.Model):
        return "tf_keras"
    return None


def keras_of(model) -> types.ModuleType:
    """Returns the Keras module `model` was built with."""
    flavour = flavour_of(model)
    if flavour == "keras":
        import keras  # pylint: disable=import-outside-toplevel
        return keras
    if flavour == "tf_keras":
        import tf_keras  # pylint: disable=import-outside-toplevel
        return tf_keras
    raise TypeError(f"{type(model).__name__} is not a Keras 3 or tf_keras model.")


def is_graph_model(model) -> bool:
    """True for Sequential and functional models (whose layer graph is known)."""
    k = keras_of(model)
    if isinstance(model, k.Sequential):
        return True
    functional = getattr(getattr(k, "src", None), "models", None)
    cls = getattr(getattr(functional, "functional", None), "Functional", None)
    if cls is None:  # tf_keras keeps Functional elsewhere.
        from tf_keras.src.engine import functional as tfk_functional  # pylint: disable=import-outside-toplevel
        cls = tfk_functional.Functional
    return isinstance(model, cls)


def is_input_layer(layer) -> bool:
    return type(layer).__name__ == "InputLayer"


# The HDF5 signature; a user block may put it at 512, 1024, 2048, ... bytes.
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def check_model_file(path: str) -> None:
    """Raises ValueError, naming the file and what is wrong, unless `path` looks
    like a Keras model file: a .keras zip archive or a .h5 HDF5 file."""
    if not os.path.exists(path):
        raise ValueError(f"No such model file: {path}.")
    if os.path.isdir(path):
        return  # A SavedModel folder: tf_keras reads it.
    ext = os.path.splitext(path)[1].lower()
    if ext == ".keras":
        if not zipfile.is_zipfile(path):
            raise ValueError(f"{path} is not a Keras model: a .keras file is a zip archive "
                             "(model.save('m.keras')), and this one is not.")
        with zipfile.ZipFile(path) as archive:
            if "config.json" not in archive.namelist():
                raise ValueError(f"{path} is a zip archive but not a Keras model: it holds no "
                                 "config.json, which model.save('m.keras') writes.")
    elif ext in (".h5", ".hdf5"):
        with open(path, "rb") as f:
            head = f.read(1 << 16)
        offsets = [0] + [512 << i for i in range(7)]
        if not any(head[o:o + 8] == _HDF5_SIGNATURE for o in offsets):
            raise ValueError(f"{path} is not a Keras model: a {ext} file is an HDF5 file, "
                             "and this one is not.")
    else:
        raise ValueError(f"{path} is not a Keras model file: pass a .keras or .h5 file "
                         "(model.save('m.keras')).")


def load_model(path: str):
    """Loads a .keras/.h5 model with Keras 3, falling back to tf_keras.

    Files saved by tf_keras carry its layer classes and load there.

    Raises:
      ValueError: the file is missing, not a Keras model file, or neither
        Keras loads it.
    """
    check_model_file(path)
    import keras  # pylint: disable=import-outside-toplevel
    import tf_keras  # pylint: disable=import-outside-toplevel
    errors = []
    for loader in (tf_keras.models.load_model, keras.models.load_model):
        try:
            return loader(path, compile=False)
        except Exception as e:  # pylint: disable=broad-except
            errors.append(f"{loader.__module__}: {type(e).__name__}: {e}")
    raise ValueError(f"Cannot load {path} as a Keras model:\n  " + "\n  ".join(errors))
