// A Spark application in a jar, for spark-submit --class (tests/e2e/test_start_modes.py): sums
// 0..n-1 in 1000 groups through a shuffle and prints one JSON line with the answer.
import org.apache.spark.sql.Row;
import org.apache.spark.sql.SparkSession;

public final class SumJob {
  public static void main(String[] args) {
    long rows = Long.parseLong(args[0]);
    SparkSession spark = SparkSession.builder().appName("stoker-e2e-sum-jar").getOrCreate();
    Row r = spark.range(rows).selectExpr("id % 1000 AS g", "id")
        .groupBy("g").sum("id")
        .selectExpr("count(*) AS groups", "sum(`sum(id)`) AS total")
        .first();
    System.out.println("{\"event\": \"result\", \"groups\": " + r.getLong(0) + ", \"sum\": " + r.getLong(1)
        + ", \"app_id\": \"" + spark.sparkContext().applicationId() + "\"}");
    spark.stop();
  }
}
