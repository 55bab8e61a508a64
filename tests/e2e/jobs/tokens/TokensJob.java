// Hadoop delegation tokens under stoker (tests/e2e/test_delegation_tokens.py). Two modes:
//
//   TokensJob write-token-file <path> <kind> <service>
//     writes a Hadoop token storage file holding one token of that kind and service: the file a
//     launcher (YARN, Oozie, a workflow scheduler that logged in to Kerberos and fetched tokens)
//     hands a driver through HADOOP_TOKEN_FILE_LOCATION, which Hadoop's UserGroupInformation
//     loads into the driver's login user;
//
//   TokensJob <executors>   (under spark-submit)
//     waits (at most 120 s) until <executors> executors registered, runs 8 tasks per executor,
//     each returning its executor's id, that executor's HADOOP_TOKEN_FILE_LOCATION and the tokens
//     (kind and service) of the Hadoop user the task runs as, and prints one JSON line with them
//     and the driver's own view.
import java.io.File;
import java.util.ArrayList;
import java.util.List;
import java.util.TreeMap;
import java.util.TreeSet;
import java.util.concurrent.Semaphore;
import java.util.concurrent.TimeUnit;

import org.apache.hadoop.conf.Configuration;
import org.apache.hadoop.fs.Path;
import org.apache.hadoop.io.Text;
import org.apache.hadoop.security.Credentials;
import org.apache.hadoop.security.UserGroupInformation;
import org.apache.hadoop.security.token.Token;
import org.apache.hadoop.security.token.TokenIdentifier;
import org.apache.spark.SparkEnv;
import org.apache.spark.api.java.JavaSparkContext;
import org.apache.spark.scheduler.SparkListener;
import org.apache.spark.scheduler.SparkListenerExecutorAdded;
import org.apache.spark.sql.SparkSession;

public final class TokensJob {
  /** The current Hadoop user's tokens as sorted "kind service" strings. */
  static List<String> tokens() throws Exception {
    TreeSet<String> out = new TreeSet<>();
    for (Token<? extends TokenIdentifier> t : UserGroupInformation.getCurrentUser().getCredentials().getAllTokens()) {
      out.add(t.getKind() + " " + t.getService());
    }
    return new ArrayList<>(out);
  }

  static String json(String s) {
    return s == null ? "null" : "\"" + s.replace("\\", "\\\\").replace("\"", "\\\"") + "\"";
  }

  static String json(List<String> xs) {
    StringBuilder b = new StringBuilder("[");
    for (int i = 0; i < xs.size(); i++) {
      b.append(i == 0 ? "" : ", ").append(json(xs.get(i)));
    }
    return b.append("]").toString();
  }

  public static void main(String[] args) throws Exception {
    if (args[0].equals("write-token-file")) {
      Credentials creds = new Credentials();
      Text service = new Text(args[3]);
      creds.addToken(service, new Token<TokenIdentifier>(
          "stoker-e2e-identifier".getBytes("UTF-8"), "stoker-e2e-password".getBytes("UTF-8"),
          new Text(args[2]), service));
      creds.writeTokenStorageFile(new Path(new File(args[1]).toURI()), new Configuration());
      return;
    }
    int executors = Integer.parseInt(args[0]);
    SparkSession spark = SparkSession.builder().appName("stoker-e2e-tokens").getOrCreate();
    JavaSparkContext sc = new JavaSparkContext(spark.sparkContext());
    // Every executor takes tasks only if all are there when the job starts (the driver counts
    // too): woken by each executor's registration, the count read again each time.
    Semaphore added = new Semaphore(0);
    sc.sc().addSparkListener(new SparkListener() {
      @Override
      public void onExecutorAdded(SparkListenerExecutorAdded event) {
        added.release();
      }
    });
    long deadline = System.nanoTime() + 120_000_000_000L;
    while (sc.sc().statusTracker().getExecutorInfos().length < executors + 1) {
      long left = deadline - System.nanoTime();
      if (left <= 0 || !added.tryAcquire(left, TimeUnit.NANOSECONDS)) {
        throw new IllegalStateException("fewer than " + executors + " executors registered in 120 s");
      }
    }
    List<Integer> ids = new ArrayList<>();
    for (int i = 0; i < 8 * executors; i++) {
      ids.add(i);
    }
    List<List<String>> seen = sc.parallelize(ids, ids.size()).map(i -> {
      // Workload, not a wait: tasks of 100 ms, so that no executor runs them all before the
      // others start theirs.
      Thread.sleep(100);
      List<String> row = new ArrayList<>();
      row.add(SparkEnv.get().executorId());
      row.add(System.getenv("HADOOP_TOKEN_FILE_LOCATION"));
      row.addAll(tokens());
      return row;
    }).collect();
    TreeMap<String, String> byExecutor = new TreeMap<>();
    for (List<String> row : seen) {
      byExecutor.put(row.get(0), "{\"token_file_env\": " + json(row.get(1)) + ", \"tokens\": "
          + json(row.subList(2, row.size())) + "}");
    }
    StringBuilder out = new StringBuilder("{");
    for (String id : byExecutor.keySet()) {
      out.append(out.length() == 1 ? "" : ", ").append(json(id)).append(": ").append(byExecutor.get(id));
    }
    System.out.println("{\"event\": \"result\", \"app_id\": " + json(sc.sc().applicationId())
        + ", \"security_enabled\": " + UserGroupInformation.isSecurityEnabled()
        + ", \"driver_tokens\": " + json(tokens())
        + ", \"executors\": " + out + "}}");
    spark.stop();
  }
}
