/* C API of the native SMTM runtime: runs an SMTM .tflite frame by frame with
 * early exits, making the Python runtime's (smtm_tf.runtime.SmtmRuntime)
 * decisions. Nothing throws across this API: every call returns a status
 * (SMTM_OK or an error code) and smtm_last_error() says what went wrong.
 * A handle is not thread-safe; use one per thread or lock around calls. */
#ifndef SMTM_RUNTIME_H_
#define SMTM_RUNTIME_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct smtm_runtime smtm_runtime;

/* Status codes (the values of smtm::Error::Code). */
typedef enum {
  SMTM_OK = 0,
  SMTM_ERROR_MODEL_FILE = 1, /* not an SMTM .tflite, damaged, or malformed */
  SMTM_ERROR_FRAME = 2,      /* non-finite pixels or model outputs */
  SMTM_ERROR_STATE = 3,      /* a state file that cannot be used */
  SMTM_ERROR_BACKEND = 4,    /* the accelerator cannot run the model */
  SMTM_ERROR_ARGUMENT = 5,   /* a bad argument (null pointer, frame size) */
  SMTM_ERROR_IO = 6,         /* a file cannot be read or written */
  SMTM_ERROR_INTERNAL = 99   /* an unexpected failure (e.g. out of memory) */
} smtm_status;

typedef enum {
  SMTM_BACKEND_CPU = 0,
  SMTM_BACKEND_GPU_FP32 = 1,
  SMTM_BACKEND_GPU_FP16 = 2
} smtm_backend;

typedef struct {
  int backend;     /* an smtm_backend value */
  int cpu_threads; /* CPU backend; >= 1 */
  int strict;      /* GPU: nonzero = every op must run on the GPU */
} smtm_options;

typedef struct {
  int64_t exits, checks, disagreements, reverts;
  int last_hit;
} smtm_counters;

/* Default options: CPU, 1 thread, strict. */
smtm_options smtm_default_options(void);

/* Creates a runtime from the .tflite bytes (copied). `options` may be NULL. */
smtm_status smtm_create(const void* model, size_t size, const smtm_options* options,
                        smtm_runtime** out);
void smtm_destroy(smtm_runtime* runtime);

/* Classifies one frame: `size` float32 pixels in the model's input shape. */
smtm_status smtm_classify(smtm_runtime* runtime, const float* frame, size_t size,
                          int* class_id, int* exit_stage);
/* The full model's class, without early exits or memory updates. */
smtm_status smtm_classify_full(smtm_runtime* runtime, const float* frame, size_t size,
                               int* class_id);
/* Forgets the stream (cache, short-term tier, adapted centres). */
smtm_status smtm_reset(smtm_runtime* runtime);
/* Switches to another exit rule and cache policy, as Python's
   SmtmRuntime.set_exit_rule does: `rule_json` is a NUL-terminated JSON object
   in the descriptor's schema, {"exit_rule": {...}, "cache": {...} or null}
   (docs/descriptor_spec.md). Starts a fresh memory. SMTM_ERROR_ARGUMENT (the
   message names the field) when it does not parse or fit the model; the
   current rule then stays. */
smtm_status smtm_set_exit_rule(smtm_runtime* runtime, const char* rule_json);
/* Writes the adaptive memory's state to `path` atomically. */
smtm_status smtm_save_state(smtm_runtime* runtime, const char* path);
/* Restores a state: *restored = 1, or 0 when the file is missing, damaged or
 * for another model (the memory then starts fresh; smtm_last_error says why). */
smtm_status smtm_load_state(smtm_runtime* runtime, const char* path, int* restored);
smtm_status smtm_counters_get(const smtm_runtime* runtime, smtm_counters* out);

int smtm_num_stages(const smtm_runtime* runtime);
int smtm_num_classes(const smtm_runtime* runtime);
/* Float32 values per frame. */
size_t smtm_frame_size(const smtm_runtime* runtime);

/* The message of the last failed call on this thread ("" if none). */
const char* smtm_last_error(void);

#ifdef __cplusplus
}
#endif

#endif /* SMTM_RUNTIME_H_ */
