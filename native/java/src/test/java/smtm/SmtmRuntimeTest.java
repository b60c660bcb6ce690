package smtm;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;
import static org.junit.jupiter.api.Assumptions.assumeTrue;

import java.io.IOException;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.Paths;
import java.util.Arrays;
import java.util.List;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

/** SmtmRuntime over JNI: errors, state files and the golden decisions of one demo model. */
class SmtmRuntimeTest {
  private static final String MODEL = "demo_resnet";

  private static Path golden() {
    String dir = System.getenv("SMTM_GOLDEN_DIR");
    assumeTrue(dir != null && !dir.isEmpty(), "SMTM_GOLDEN_DIR not set");
    return Paths.get(dir);
  }

  /** A little-endian .npy array: float32 or int32, C order. */
  private static final class Npy {
    final int[] shape;
    final ByteBuffer data;

    Npy(Path path) throws IOException {
      ByteBuffer b = ByteBuffer.wrap(Files.readAllBytes(path)).order(ByteOrder.LITTLE_ENDIAN);
      int major = b.get(6);
      int headerLen = major == 1 ? b.getShort(8) & 0xffff : b.getInt(8);
      int start = major == 1 ? 10 : 12;
      String header = new String(b.array(), start, headerLen, StandardCharsets.ISO_8859_1);
      String dims = header.substring(header.indexOf('(') + 1, header.indexOf(')'));
      shape = Arrays.stream(dims.split(",")).map(String::trim).filter(s -> !s.isEmpty())
          .mapToInt(Integer::parseInt).toArray();
      b.position(start + headerLen);
      data = b.slice().order(ByteOrder.LITTLE_ENDIAN);
    }

    int rowSize() {
      int n = 1;
      for (int i = 1; i < shape.length; ++i) {
        n *= shape[i];
      }
      return n;
    }

    float[] floatRow(int i) {
      float[] out = new float[rowSize()];
      data.position(i * out.length * 4);
      data.asFloatBuffer().get(out);
      return out;
    }

    int[] intRow(int i) {
      int[] out = new int[rowSize()];
      data.position(i * out.length * 4);
      data.asIntBuffer().get(out);
      return out;
    }
  }

  @Test
  void garbageIsAModelFileError() {
    SmtmException e = assertThrows(SmtmException.class, () -> new SmtmRuntime(new byte[4096]));
    assertEquals(SmtmException.MODEL_FILE, e.code());
  }

  @Test
  void goldenDecisionsOnEveryStreamKind() throws IOException {
    Path dir = golden();
    try (SmtmRuntime rt = SmtmRuntime.fromFile(dir.resolve(MODEL + ".tflite"))) {
      List<String> kinds = Files.readAllLines(dir.resolve("stream_kinds.txt"));
      assertTrue(kinds.size() >= 7, "stream kinds in " + dir + ": " + kinds);
      for (String kind : kinds) {
        Npy frames = new Npy(dir.resolve(MODEL).resolve(kind + ".frames.npy"));
        Npy want = new Npy(dir.resolve(MODEL).resolve(kind + ".decisions.npy"));
        assertEquals(rt.frameSize(), frames.rowSize());
        rt.reset();
        for (int i = 0; i < frames.shape[0]; ++i) {
          SmtmRuntime.Result r = rt.classify(frames.floatRow(i));
          assertArrayEquals(want.intRow(i), new int[] {r.classId, r.exitStage},
              MODEL + " " + kind + " frame " + i);
        }
      }
    }
  }

  @Test
  void badFramesStateFilesAndClose(@TempDir Path tmp) throws IOException {
    Path dir = golden();
    Npy frames = new Npy(dir.resolve(MODEL).resolve("video.frames.npy"));
    SmtmRuntime rt = SmtmRuntime.fromFile(dir.resolve(MODEL + ".tflite"));
    float[] nan = frames.floatRow(0);
    nan[5] = Float.NaN;
    assertEquals(SmtmException.FRAME, assertThrows(SmtmException.class, () -> rt.classify(nan))
        .code());
    assertEquals(SmtmException.ARGUMENT,
        assertThrows(SmtmException.class, () -> rt.classify(new float[3])).code());
    // Larger than the runtime's frame buffer: refused, not copied into it.
    float[] large = new float[rt.frameSize() + 1];
    assertEquals(SmtmException.ARGUMENT,
        assertThrows(SmtmException.class, () -> rt.classifyFull(large)).code());
    // The pixels are copied: the caller's array is left as it was.
    float[] row = frames.floatRow(0);
    rt.classifyFull(row);
    assertArrayEquals(frames.floatRow(0), row);
    assertEquals(rt.classifyFull(frames.floatRow(0)), rt.classify(frames.floatRow(0)).classId);
    for (int i = 1; i < 100; ++i) {
      rt.classify(frames.floatRow(i));
    }
    String state = tmp.resolve("state.npz").toString();
    rt.saveState(state);
    try (SmtmRuntime other = SmtmRuntime.fromFile(dir.resolve(MODEL + ".tflite"))) {
      assertTrue(other.loadState(state));
      for (int i = 100; i < frames.shape[0]; ++i) {
        SmtmRuntime.Result a = rt.classify(frames.floatRow(i));
        SmtmRuntime.Result b = other.classify(frames.floatRow(i));
        assertEquals(a.classId, b.classId, "frame " + i);
        assertEquals(a.exitStage, b.exitStage, "frame " + i);
      }
      assertFalse(other.loadState(tmp.resolve("missing.npz").toString()));
    }
    rt.close();
    rt.close();  // Idempotent.
    assertThrows(IllegalStateException.class, () -> rt.classify(frames.floatRow(0)));
  }

  @Test
  void setExitRuleRefusesWhatDoesNotFitAndTakesWhatDoes() throws IOException {
    Path dir = golden();
    Npy frames = new Npy(dir.resolve(MODEL).resolve("video.frames.npy"));
    try (SmtmRuntime rt = SmtmRuntime.fromFile(dir.resolve(MODEL + ".tflite"))) {
      int stages = rt.numStages();
      SmtmException e = assertThrows(SmtmException.class, () -> rt.setExitRule("{\"cache\":null}"));
      assertEquals(SmtmException.ARGUMENT, e.code());
      assertTrue(e.getMessage().contains("exit_rule"), e.getMessage());
      assertEquals(SmtmException.ARGUMENT,
          assertThrows(SmtmException.class, () -> rt.setExitRule(null)).code());
      // A margin of 1e9 is never reached: every frame runs to the head.
      StringBuilder never = new StringBuilder("{\"exit_rule\":{\"metric\":\"margin\",\"thresholds\":[");
      for (int s = 0; s < stages; ++s) {
        never.append(s == 0 ? "1e9" : ",1e9");
      }
      never.append("],\"target_agreement\":0.99},\"cache\":null}");
      rt.setExitRule(never.toString());
      for (int i = 0; i < 20; ++i) {
        assertEquals(stages, rt.classify(frames.floatRow(i)).exitStage, "frame " + i);
      }
    }
  }
}
