// JNI glue of smtm.SmtmRuntime over the C API (smtm_runtime.h): every
// failure becomes a Java exception (smtm.SmtmException with the status).
#include <jni.h>

#include <string>

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

smtm_runtime* Handle(jlong h) { return reinterpret_cast<smtm_runtime*>(h); }

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
  return reinterpret_cast<jlong>(rt);
}

JNIEXPORT void JNICALL Java_smtm_SmtmRuntime_nativeDestroy(JNIEnv*, jclass, jlong h) {
  smtm_destroy(Handle(h));
}

JNIEXPORT void JNICALL Java_smtm_SmtmRuntime_nativeClassify(JNIEnv* env, jclass, jlong h,
                                                            jfloatArray frame, jintArray out) {
  jsize n = env->GetArrayLength(frame);
  // Critical access: no copy of the pixels, no JNI calls until released.
  void* pixels = env->GetPrimitiveArrayCritical(frame, nullptr);
  if (pixels == nullptr) return;
  int result[2] = {0, 0};
  smtm_status status = smtm_classify(Handle(h), static_cast<const float*>(pixels),
                                     static_cast<size_t>(n), &result[0], &result[1]);
  env->ReleasePrimitiveArrayCritical(frame, pixels, JNI_ABORT);
  if (!Ok(env, status)) return;
  env->SetIntArrayRegion(out, 0, 2, result);
}

JNIEXPORT jint JNICALL Java_smtm_SmtmRuntime_nativeClassifyFull(JNIEnv* env, jclass, jlong h,
                                                                jfloatArray frame) {
  jsize n = env->GetArrayLength(frame);
  void* pixels = env->GetPrimitiveArrayCritical(frame, nullptr);
  if (pixels == nullptr) return -1;
  int cls = -1;
  smtm_status status = smtm_classify_full(Handle(h), static_cast<const float*>(pixels),
                                          static_cast<size_t>(n), &cls);
  env->ReleasePrimitiveArrayCritical(frame, pixels, JNI_ABORT);
  Ok(env, status);
  return cls;
}

JNIEXPORT void JNICALL Java_smtm_SmtmRuntime_nativeReset(JNIEnv* env, jclass, jlong h) {
  Ok(env, smtm_reset(Handle(h)));
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
