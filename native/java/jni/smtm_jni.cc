// JNI glue of smtm.SmtmRuntime over the C API (smtm_runtime.h): every
// failure becomes a Java exception (smtm.SmtmException with the status).
#include <jni.h>

#include <new>
#include <string>
#include <vector>

#include "smtm_SmtmRuntime.h"
#include "smtm_runtime.h"

namespace {

void Throw(JNIEnv* env, int code, const std::string& message) {
  jclass cls = env->FindClass("smtm/SmtmException");
  if (cls == nullptr) return;  // NoClassDefFoundError is pending.
  jmethodID ctor = env->GetMethodID(cls, "<init>", "(ILjava/lang/String;)V");
  jstring text = env->NewStringUTF(message.c_str());
  jobject error = env->NewObject(cls, ctor, static_cast<jint>(code), text);
  if (error != nullptr) env->Throw(static_cast<jthrowable>(error));
}

// True if ok; else a Java exception is pending.
bool Ok(JNIEnv* env, smtm_status status) {
  if (status == SMTM_OK) return true;
  Throw(env, status, smtm_last_error());
  return false;
}

// What a Java handle points to: the runtime and the frame buffer its
// classify calls copy the pixels into. The pixels are copied out of the Java
// array (GetFloatArrayRegion) rather than pinned for the model run: critical
// access over a whole run could stall the collector and every other thread
// that allocates. One buffer per runtime, sized once: no allocation per frame
// (SmtmRuntime is not thread-safe, so its calls never share the buffer).
struct Binding {
  smtm_runtime* runtime = nullptr;
  std::vector<float> frame;
};

Binding* Bound(jlong h) { return reinterpret_cast<Binding*>(h); }
smtm_runtime* Handle(jlong h) { return Bound(h)->runtime; }

// The frame's pixels copied into the binding's buffer, `*n` its length;
// nullptr with a Java exception pending when they cannot be read. A frame of
// another size is not copied: the runtime refuses its size before reading
// any pixel, and says what size it needs.
const float* CopyFrame(JNIEnv* env, Binding* b, jfloatArray frame, size_t* n) {
  if (frame == nullptr) {
    Throw(env, SMTM_ERROR_ARGUMENT, "frame is null");
    return nullptr;
  }
  *n = static_cast<size_t>(env->GetArrayLength(frame));
  if (*n != b->frame.size()) return b->frame.data();
  env->GetFloatArrayRegion(frame, 0, static_cast<jsize>(*n), b->frame.data());
  if (env->ExceptionCheck()) return nullptr;
  return b->frame.data();
}

std::string Utf(JNIEnv* env, jstring s) {
  if (s == nullptr) return std::string();
  const char* chars = env->GetStringUTFChars(s, nullptr);
  std::string out = chars ? chars : "";
  if (chars) env->ReleaseStringUTFChars(s, chars);
  return out;
}

}  // namespace

extern "C" {

JNIEXPORT jlong JNICALL Java_smtm_SmtmRuntime_nativeCreate(JNIEnv* env, jclass, jbyteArray model,
                                                           jint backend, jint threads,
                                                           jboolean strict) {
  jsize n = env->GetArrayLength(model);
  jbyte* bytes = env->GetByteArrayElements(model, nullptr);
  if (bytes == nullptr) return 0;
  smtm_options options = smtm_default_options();
  options.backend = backend;
  options.cpu_threads = threads;
  options.strict = strict ? 1 : 0;
  smtm_runtime* rt = nullptr;
  smtm_status status = smtm_create(bytes, static_cast<size_t>(n), &options, &rt);
  env->ReleaseByteArrayElements(model, bytes, JNI_ABORT);
  if (!Ok(env, status)) return 0;
  auto* b = new (std::nothrow) Binding;
  if (b != nullptr) {
    b->runtime = rt;
    try {
      b->frame.resize(smtm_frame_size(rt));
    } catch (const std::bad_alloc&) {
      delete b;
      b = nullptr;
    }
  }
  if (b == nullptr) {
    smtm_destroy(rt);
    Throw(env, SMTM_ERROR_INTERNAL, "out of memory for the frame buffer");
    return 0;
  }
  return reinterpret_cast<jlong>(b);
}

JNIEXPORT void JNICALL Java_smtm_SmtmRuntime_nativeDestroy(JNIEnv*, jclass, jlong h) {
  Binding* b = Bound(h);
  if (b == nullptr) return;
  smtm_destroy(b->runtime);
  delete b;
}

JNIEXPORT void JNICALL Java_smtm_SmtmRuntime_nativeClassify(JNIEnv* env, jclass, jlong h,
                                                            jfloatArray frame, jintArray out) {
  size_t n = 0;
  const float* pixels = CopyFrame(env, Bound(h), frame, &n);
  if (pixels == nullptr) return;
  int result[2] = {0, 0};
  if (!Ok(env, smtm_classify(Handle(h), pixels, n, &result[0], &result[1]))) return;
  env->SetIntArrayRegion(out, 0, 2, result);
}

JNIEXPORT jint JNICALL Java_smtm_SmtmRuntime_nativeClassifyFull(JNIEnv* env, jclass, jlong h,
                                                                jfloatArray frame) {
  size_t n = 0;
  const float* pixels = CopyFrame(env, Bound(h), frame, &n);
  if (pixels == nullptr) return -1;
  int cls = -1;
  Ok(env, smtm_classify_full(Handle(h), pixels, n, &cls));
  return cls;
}

JNIEXPORT void JNICALL Java_smtm_SmtmRuntime_nativeReset(JNIEnv* env, jclass, jlong h) {
  Ok(env, smtm_reset(Handle(h)));
}

JNIEXPORT void JNICALL Java_smtm_SmtmRuntime_nativeSetExitRule(JNIEnv* env, jclass, jlong h,
                                                               jstring rule_json) {
  if (rule_json == nullptr) return Throw(env, SMTM_ERROR_ARGUMENT, "ruleJson is null");
  Ok(env, smtm_set_exit_rule(Handle(h), Utf(env, rule_json).c_str()));
}

JNIEXPORT void JNICALL Java_smtm_SmtmRuntime_nativeSaveState(JNIEnv* env, jclass, jlong h,
                                                             jstring path) {
  if (path == nullptr) return Throw(env, SMTM_ERROR_ARGUMENT, "path is null");
  Ok(env, smtm_save_state(Handle(h), Utf(env, path).c_str()));
}

JNIEXPORT jboolean JNICALL Java_smtm_SmtmRuntime_nativeLoadState(JNIEnv* env, jclass, jlong h,
                                                                 jstring path) {
  if (path == nullptr) {
    Throw(env, SMTM_ERROR_ARGUMENT, "path is null");
    return JNI_FALSE;
  }
  int restored = 0;
  if (!Ok(env, smtm_load_state(Handle(h), Utf(env, path).c_str(), &restored))) return JNI_FALSE;
  return restored ? JNI_TRUE : JNI_FALSE;
}

JNIEXPORT jint JNICALL Java_smtm_SmtmRuntime_nativeNumStages(JNIEnv*, jclass, jlong h) {
  return smtm_num_stages(Handle(h));
}

JNIEXPORT jint JNICALL Java_smtm_SmtmRuntime_nativeNumClasses(JNIEnv*, jclass, jlong h) {
  return smtm_num_classes(Handle(h));
}

JNIEXPORT jlong JNICALL Java_smtm_SmtmRuntime_nativeFrameSize(JNIEnv*, jclass, jlong h) {
  return static_cast<jlong>(smtm_frame_size(Handle(h)));
}

}  // extern "C"
