package smtm;

/** A failure of the native SMTM runtime; {@link #code()} is the C API's status. */
public final class SmtmException extends RuntimeException {
  public static final int MODEL_FILE = 1;
  public static final int FRAME = 2;
  public static final int STATE = 3;
  public static final int BACKEND = 4;
  public static final int ARGUMENT = 5;
  public static final int IO = 6;
  public static final int INTERNAL = 99;

  private static final long serialVersionUID = 1L;

  private final int code;

  public SmtmException(int code, String message) {
    super(message);
    this.code = code;
  }

  /** One of the constants above. */
  public int code() {
    return code;
  }
}
