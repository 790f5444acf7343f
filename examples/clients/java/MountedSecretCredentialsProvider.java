import io.camunda.client.CredentialsProvider;
import java.io.IOException;
import java.nio.file.Files;
import java.nio.file.NoSuchFileException;
import java.nio.file.Path;
import java.util.LinkedHashMap;
import java.util.Map;

/**
 * Recipe for io.camunda:camunda-client-java (tested with 8.9.0): a {@link CredentialsProvider}
 * that sends the credential tasklist-operator keeps in its derived Secret, mounted as a volume,
 * and follows it when the operator replaces it. One provider for every auth method: the Secret's
 * {@code authorization} ({@code Bearer …} for oauth2, {@code Basic …} for basic) or its {@code
 * cookie} plus {@code csrfToken} as the X-CSRF-TOKEN header (cookie login).
 *
 * <pre>{@code
 * CamundaClient client = CamundaClient.newClientBuilder()
 *     .restAddress(URI.create(System.getenv("TASKLIST_URL")))
 *     .preferRestOverGrpc(true)
 *     .credentialsProvider(new MountedSecretCredentialsProvider(Path.of("/var/run/tasklist")))
 *     .build();
 * }</pre>
 *
 * <p>See docs/clients.md.
 */
public final class MountedSecretCredentialsProvider implements CredentialsProvider {
  private final Path dir;
  private String version;
  private Map<String, String> headers;

  public MountedSecretCredentialsProvider(Path dir) throws IOException {
    this.dir = dir;
    reload();
  }

  @Override
  public synchronized void applyCredentials(CredentialsApplier applier) throws IOException {
    if (!contentsVersion().equals(version)) {
      reload();
    }
    headers.forEach(applier::put);
  }

  /**
   * The kubelet updates a mounted Secret up to a minute or more after the operator wrote it, so
   * a token can expire in the file: on a 401, read the files again and let the client retry
   * (it does so at most twice, and only for REST calls).
   */
  @Override
  public boolean shouldRetryRequest(StatusCode statusCode) {
    if (!statusCode.isUnauthorized()) {
      return false;
    }
    try {
      synchronized (this) {
        reload();
      }
      return true;
    } catch (IOException e) {
      return false;
    }
  }

  /**
   * The kubelet writes a Secret volume as timestamped folders and swaps the symlink {@code ..data}
   * to the new one atomically; every key file is a symlink through {@code ..data}. So its target
   * names the contents. (A folder that is not a kubelet volume falls back to the file's
   * modification time.)
   */
  private String contentsVersion() throws IOException {
    try {
      return Files.readSymbolicLink(dir.resolve("..data")).toString();
    } catch (NoSuchFileException | UnsupportedOperationException e) {
      String key = Files.exists(dir.resolve("authorization")) ? "authorization" : "cookie";
      return Files.getLastModifiedTime(dir.resolve(key)).toString();
    }
  }

  private void reload() throws IOException {
    // The version first: a swap in between only makes the next call read again.
    String newVersion = contentsVersion();
    Map<String, String> newHeaders = new LinkedHashMap<>();
    Path authorization = dir.resolve("authorization");
    if (Files.exists(authorization)) {
      newHeaders.put("Authorization", read(authorization));
    } else {
      newHeaders.put("Cookie", read(dir.resolve("cookie")));
      Path csrfToken = dir.resolve("csrfToken");
      if (Files.exists(csrfToken)) {
        newHeaders.put("X-CSRF-TOKEN", read(csrfToken));
      }
    }
    version = newVersion;
    headers = newHeaders;
  }

  private static String read(Path file) throws IOException {
    return new String(Files.readAllBytes(file), java.nio.charset.StandardCharsets.UTF_8).trim();
  }
}
