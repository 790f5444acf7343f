import io.camunda.client.CamundaClient;
import io.camunda.client.CredentialsProvider;
import io.camunda.client.api.command.ClientHttpException;
import java.net.URI;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Duration;

/**
 * Calls the Orchestration Cluster API (POST /v2/user-tasks/search) through camunda-client-java in
 * a loop, as an application would, and prints each call's HTTP status on a line of its own, until
 * its stdin closes (tests/clients.rs).
 *
 * <p>java Loop <recipe|once> <secret folder> <url>; once: the control, a provider given the
 * mounted Authorization header once, at start, with no recipe.
 */
public final class Loop {
  public static void main(String[] args) throws Exception {
    String recipe = args[0];
    Path dir = Path.of(args[1]);
    URI url = URI.create(args[2]);
    CredentialsProvider credentials =
        switch (recipe) {
          case "recipe" -> new MountedSecretCredentialsProvider(dir);
          case "once" -> fixed(Files.readString(dir.resolve("authorization"), StandardCharsets.UTF_8).trim());
          default -> throw new IllegalArgumentException("unknown recipe " + recipe);
        };
    Thread stdin =
        new Thread(
            () -> {
              try {
                while (System.in.read() >= 0) {}
              } catch (Exception ignored) {
              }
            });
    stdin.setDaemon(true);
    stdin.start();
    try (CamundaClient client =
        CamundaClient.newClientBuilder()
            .applyEnvironmentVariableOverrides(false)
            .restAddress(url)
            .grpcAddress(url)
            .preferRestOverGrpc(true)
            .defaultRequestTimeout(Duration.ofSeconds(10))
            .credentialsProvider(credentials)
            .build()) {
      while (stdin.isAlive()) {
        String line;
        try {
          client.newUserTaskSearchRequest().send().join();
          line = "200";
        } catch (RuntimeException e) {
          line = status(e);
        }
        System.out.println(line);
        System.out.flush();
        Thread.sleep(50);
      }
    }
    System.exit(0);
  }

  /** The HTTP status of a failed call, from the exception or its causes; never the message. */
  private static String status(Throwable error) {
    for (Throwable cause = error; cause != null; cause = cause.getCause()) {
      if (cause instanceof ClientHttpException http) {
        return String.valueOf(http.code());
      }
    }
    return "error " + error.getClass().getSimpleName();
  }

  private static CredentialsProvider fixed(String authorization) {
    return new CredentialsProvider() {
      @Override
      public void applyCredentials(CredentialsApplier applier) {
        applier.put("Authorization", authorization);
      }

      @Override
      public boolean shouldRetryRequest(StatusCode statusCode) {
        return false;
      }
    };
  }
}
