package smtm;

import java.io.IOException;
import java.nio.file.Files;
import java.nio.file.Path;

/**
 * Runs an SMTM .tflite frame by frame with early exits, making the decisions of the Python
 * runtime (smtm_tf.runtime.SmtmRuntime). Wraps the native C API (smtm_runtime.h) over JNI.
 *
 * <p>Not thread-safe: use one instance per thread. Close it to free the native runtime.
 * The native library is loaded from the system property {@code smtm.jni.library} (a path)
 * if set, else with {@code System.loadLibrary("smtm_jni")}.
 */
public final class SmtmRuntime implements AutoCloseable {
  static {
    String path = System.getProperty("smtm.jni.library");
    if (path != null) {
      System.load(path);
    } else {
      System.loadLibrary("smtm_jni");
    }
  }

  /** Where the model runs. GPU_FP32 keeps float32 precision; GPU_FP16 is faster, less exact. */
  public enum Backend { CPU, GPU_FP32, GPU_FP16 }

  /** A frame's answer: the class and the stage it exited at (numStages() for the head). */
  public static final class Result {
    public final int classId;
    public final int exitStage;

    Result(int classId, int exitStage) {
      this.classId = classId;
      this.exitStage = exitStage;
    }
  }

  private long handle;
  private final int frameSize;

  /** Loads a model on the CPU with one thread. */
  public SmtmRuntime(byte[] model) {
    this(model, Backend.CPU, 1, true);
  }

  /**
   * Loads a model.
   *
   * @param cpuThreads CPU threads (CPU backend), at least 1
   * @param strict GPU backends: fail unless every op runs on the GPU
   * @throws SmtmException MODEL_FILE for a file that is not a valid SMTM model, BACKEND when
   *     the backend cannot run it
   */
  public SmtmRuntime(byte[] model, Backend backend, int cpuThreads, boolean strict) {
    if (model == null) {
      throw new IllegalArgumentException("model is null");
    }
    handle = nativeCreate(model, backend.ordinal(), cpuThreads, strict);
    frameSize = (int) nativeFrameSize(handle);
  }

  public static SmtmRuntime fromFile(Path path) throws IOException {
    return new SmtmRuntime(Files.readAllBytes(path));
  }

  /**
   * Classifies one frame of float32 pixels in the model's input shape (H, W, C order).
   *
   * @throws SmtmException FRAME for non-finite pixels or outputs (the memory is unchanged),
   *     ARGUMENT for a frame of another size
   */
  public Result classify(float[] frame) {
    int[] out = new int[2];
    nativeClassify(live(), checked(frame), out);
    return new Result(out[0], out[1]);
  }

  /** The full model's class, without early exits or memory updates. */
  public int classifyFull(float[] frame) {
    return nativeClassifyFull(live(), checked(frame));
  }

  /** Forgets the stream: cache, short-term tier, adapted centres. */
  public void reset() {
    nativeReset(live());
  }

  /**
   * Switches to another exit rule and cache policy (Python's {@code set_exit_rule}) and starts a
   * fresh memory.
   *
   * @param ruleJson {@code {"exit_rule": {...}, "cache": {...} or null}} in the descriptor's
   *     schema
   * @throws SmtmException (argument) naming the field when it does not parse or fit the model
   */
  public void setExitRule(String ruleJson) {
    nativeSetExitRule(live(), ruleJson);
  }

  /** Writes the adaptive memory's state atomically (the Python runtime reads it too). */
  public void saveState(String path) {
    nativeSaveState(live(), path);
  }

  /**
   * Restores a state saved here or by the Python runtime.
   *
   * @return false when the file is missing, damaged or for another model: the memory then
   *     starts fresh
   */
  public boolean loadState(String path) {
    return nativeLoadState(live(), path);
  }

  public int numStages() {
    return nativeNumStages(live());
  }

  public int numClasses() {
    return nativeNumClasses(live());
  }

  /** Float32 values per frame. */
  public int frameSize() {
    return frameSize;
  }

  @Override
  public void close() {
    if (handle != 0) {
      nativeDestroy(handle);
      handle = 0;
    }
  }

  private long live() {
    if (handle == 0) {
      throw new IllegalStateException("The SmtmRuntime is closed.");
    }
    return handle;
  }

  private float[] checked(float[] frame) {
    if (frame == null) {
      throw new IllegalArgumentException("frame is null");
    }
    return frame;
  }

  private static native long nativeCreate(byte[] model, int backend, int threads, boolean strict);

  private static native void nativeDestroy(long handle);

  private static native void nativeClassify(long handle, float[] frame, int[] out);

  private static native int nativeClassifyFull(long handle, float[] frame);

  private static native void nativeReset(long handle);

  private static native void nativeSetExitRule(long handle, String ruleJson);

  private static native void nativeSaveState(long handle, String path);

  private static native boolean nativeLoadState(long handle, String path);

  private static native int nativeNumStages(long handle);

  private static native int nativeNumClasses(long handle);

  private static native long nativeFrameSize(long handle);
}
