package org.apache.spark.scheduler.cluster.stoker

import java.net.InetSocketAddress

import scala.concurrent.Await
import scala.concurrent.duration._
import scala.jdk.CollectionConverters._

import dev.stoker.proto.v1.ApplicationEvent
import io.grpc.Server
import io.grpc.netty.shaded.io.grpc.netty.NettyServerBuilder
import org.junit.jupiter.api.{AfterEach, Test}

import org.apache.spark.{SparkConf, SparkContext, SparkException}
import org.apache.spark.resource.{ExecutorResourceRequests, ResourceProfileBuilder, TaskResourceRequests}

/**
 * A real SparkContext with a `spark+stoker://` master, against a fake stoker on localhost over
 * gRPC/Netty: the ServiceLoader lookup, Spark's internal APIs and the backend's life cycle.
 * No executor is started (the fake starts none).
 */
class StokerBackendTest extends Checks {
  import Events._

  private var server: Server = null
  private var sc: SparkContext = null

  private def startStoker(fake: FakeStoker): Int = {
    server = NettyServerBuilder.forAddress(new InetSocketAddress("127.0.0.1", 0))
      .addService(fake).build().start()
    server.getPort
  }

  private def conf(master: String): SparkConf = new SparkConf(false)
    .setMaster(master)
    .setAppName("stoker-backend-test")
    .set("spark.ui.enabled", "false")
    .set("spark.driver.host", "127.0.0.1")
    .set("spark.driver.bindAddress", "127.0.0.1")
    .set("spark.executor.instances", "2")
    .set("spark.executor.memory", "2g")
    .set("spark.executorEnv.STOKER_TEST", "yes")
    .set("spark.scheduler.minRegisteredResourcesRatio", "0")
    .set("spark.stoker.registration.timeout", "3s")

  @AfterEach def tearDown(): Unit = {
    if (sc != null) sc.stop()
    // A context stopped from another thread (stopInNewThread) is active until that thread ends.
    eventually("no active SparkContext", 30000)(SparkContext.getActive.isEmpty)
    if (server != null) server.shutdownNow().awaitTermination()
  }

  @Test def startsRegistersRequestsAndStops(): Unit = {
    val fake = new FakeStoker("inc-1", leaseTtlMs = 3000)
    val port = startStoker(fake)
    sc = new SparkContext(conf(s"spark+stoker://127.0.0.1:$port"))
    val backend = sc.schedulerBackend
    check(backend.isInstanceOf[StokerSchedulerBackend], s"backend: $backend")

    val reg = fake.registrationsSeen.head
    eq(sc.applicationId, reg.getAppId)
    check(reg.getAppId.startsWith("stoker-"), reg.getAppId)
    eq("stoker-backend-test", reg.getAppName)
    val t = reg.getTemplate
    eq(s"spark://CoarseGrainedScheduler@127.0.0.1:${sc.conf.get("spark.driver.port")}",
      t.getDriverUrl)
    eq(Seq(0), t.getProfilesList.asScala.map(_.getId).toSeq)
    eq(2048L, t.getProfiles(0).getHeapMib)
    eq(384L, t.getProfiles(0).getOverheadMib)
    eq("yes", t.getEnvironmentOrThrow("STOKER_TEST"))
    eq(sc.sparkUser, t.getEnvironmentOrThrow("SPARK_USER"))
    eq(Seq(0 -> 2L),
      reg.getInitialTargetsList.asScala.map(x => x.getResourceProfileId -> x.getTotal).toSeq)
    eq(4, reg.getFailurePolicy.getMaxFailures, "max(3, 2 * 2 executors)")
    // Spark's Kubernetes classes are on the test class path: Spark's builder made the pod.
    check(t.hasSparkPods, "Spark-built pods are sent")
    val pods = t.getSparkPods
    eq(Seq(0), pods.getProfilesList.asScala.map(_.getResourceProfileId).toSeq)
    eq("", pods.getProfiles(0).getError)
    check(pods.getProfiles(0).getPodJson.contains("\"SPARK_EXECUTOR_ID\""),
      pods.getProfiles(0).getPodJson)
    check(pods.getImageFromServer, "no image in the conf: stoker's --kube-image")
    eq(1, pods.getAppResourcesJsonCount, "the executor ConfigMap")

    // Spark's own API, through the backend, to stoker.
    check(sc.requestTotalExecutors(5, 0, Map.empty), "acknowledged")
    eventually("totals sent")(fake.callsSeen.contains("totals 0=5"))

    // A resource profile seen for the first time: the template is sent again, extended.
    val rp = new ResourceProfileBuilder()
      .require(new ExecutorResourceRequests().cores(2).memory("3g"))
      .require(new TaskResourceRequests().cpus(1)).build()
    val b = backend.asInstanceOf[StokerSchedulerBackend]
    val default = sc.resourceProfileManager.defaultResourceProfile
    eq(true, Await.result(b.doRequestTotalExecutors(Map(default -> 5, rp -> 1)), 10.seconds))
    val again = fake.registrationsSeen.last
    eq(2, fake.registrationsSeen.size)
    eq(reg.getToken, again.getToken)
    eq(Seq(0, rp.id), again.getTemplate.getProfilesList.asScala.map(_.getId).toSeq)
    eq(3072L, again.getTemplate.getProfiles(1).getHeapMib)
    eq(Seq(0, rp.id), again.getTemplate.getSparkPods.getProfilesList.asScala
      .map(_.getResourceProfileId).toSeq, "the new profile's pod is sent with the template")
    eq(Set(0 -> 5L, rp.id -> 1L),
      again.getInitialTargetsList.asScala.map(x => x.getResourceProfileId -> x.getTotal).toSet)

    // An executor the driver never saw: reported once, without harm.
    eventually("watching")(fake.activeWatchers == 1)
    fake.emit(exited("1", dev.stoker.proto.v1.ExitReason.EXIT_REASON_START_FAILED,
      message = "ErrImagePull"))
    eventually("heartbeat acks the event")(fake.heartbeatsSeen.exists(_.getAckedSeq == 1L))

    sc.stop()
    sc = null
    val tail = fake.callsSeen.filterNot(_.startsWith("watch")).takeRight(2)
    eq(Seq(s"totals 0=0,${rp.id}=0", "unregister"), tail)
  }

  @Test def aFailedApplicationStopsTheSparkContext(): Unit = {
    val fake = new FakeStoker("inc-1")
    val port = startStoker(fake)
    sc = new SparkContext(conf(s"stoker://127.0.0.1:$port"))
    eventually("watching")(fake.activeWatchers == 1)
    fake.emit(app(ApplicationEvent.Kind.KIND_FAILED, "5 executor failures (limit 4)"))
    eventually("SparkContext stopped", 20000)(sc.isStopped)
  }

  @Test def anUnreachableStokerFailsTheSparkContextClearly(): Unit = {
    val fake = new FakeStoker("inc-1")
    val port = startStoker(fake)
    server.shutdownNow().awaitTermination()
    server = null
    val t0 = System.nanoTime()
    val e = intercept[SparkException](new SparkContext(
      conf(s"spark+stoker://127.0.0.1:$port").set("spark.stoker.registration.timeout", "1s")))
    val tookMs = (System.nanoTime() - t0) / 1000000
    check(e.getMessage.contains(s"Could not register application"), e.getMessage)
    check(e.getMessage.contains(s"127.0.0.1:$port"), e.getMessage)
    check(tookMs < 15000, s"took $tookMs ms")
  }

  @Test def aBadMasterUrlFailsTheSparkContextClearly(): Unit = {
    val e = intercept[SparkException](new SparkContext(conf("spark+stoker://127.0.0.1")))
    check(e.getMessage.contains("missing port"), e.getMessage)
  }
}
