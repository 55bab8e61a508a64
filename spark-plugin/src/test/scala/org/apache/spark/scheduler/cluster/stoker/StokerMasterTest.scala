package org.apache.spark.scheduler.cluster.stoker

import java.net.{InetSocketAddress, ServerSocket}
import java.util.concurrent.TimeUnit

import dev.stoker.proto.v1.{ExecutorAllocatorGrpc, RegisterApplicationRequest}
import io.grpc.netty.shaded.io.grpc.netty.{NettyChannelBuilder, NettyServerBuilder}
import org.junit.jupiter.api.Test

import org.apache.spark.{SparkConf, SparkException}

class StokerMasterTest extends Checks {

  @Test def parsesBothSchemes(): Unit = {
    eq(StokerMaster("stoker.example.com", 7077), StokerMaster.parse("spark+stoker://stoker.example.com:7077"))
    eq(StokerMaster("10.1.2.3", 50051), StokerMaster.parse("stoker://10.1.2.3:50051"))
    eq(StokerMaster("localhost", 1), StokerMaster.parse("SPARK+STOKER://localhost:1/"))
  }

  @Test def parsesIpv6AndBuildsTargets(): Unit = {
    val m = StokerMaster.parse("spark+stoker://[::1]:7077")
    eq("::1", m.host)
    eq(7077, m.port)
    eq("[::1]:7077", m.hostPort)
    eq("dns:///[::1]:7077", m.grpcTarget)
    eq("dns:///stoker:9000", StokerMaster.parse("stoker://stoker:9000").grpcTarget)
  }

  @Test def parsesSeveralAddressesInOrder(): Unit = {
    val m = StokerMaster.parse("spark+stoker://a.example:7077,10.0.0.2:7078,[::1]:7079/")
    eq(Seq(StokerEndpoint("a.example", 7077), StokerEndpoint("10.0.0.2", 7078),
      StokerEndpoint("::1", 7079)), m.endpoints)
    eq("a.example:7077,10.0.0.2:7078,[::1]:7079", m.hostPort)
    check(m.grpcTarget.startsWith("stoker-endpoints:///"), m.grpcTarget)
    eq(m.endpoints, StokerEndpointsResolver.endpointsOf(new java.net.URI(m.grpcTarget)))
    val cases = Seq(
      "stoker://a:1,,b:2" -> "empty address",
      "stoker://a:1,b" -> "missing port",
      "stoker://a:1,a:1" -> "listed twice",
      "stoker://a:1,b:0" -> "out of range")
    cases.foreach { case (url, expected) =>
      val e = intercept[IllegalArgumentException](StokerMaster.parse(url))
      check(e.getMessage.contains(expected), s"$url: '${e.getMessage}' should mention '$expected'")
      check(e.getMessage.contains(url), s"$url: the message should quote the URL")
    }
  }

  /** A standby replica does not listen: the channel skips its address and reaches the leader. */
  @Test def aChannelOverSeveralAddressesReachesTheOneThatListens(): Unit = {
    val closed = { val s = new ServerSocket(0, 1, java.net.InetAddress.getLoopbackAddress); val p = s.getLocalPort; s.close(); p }
    val fake = new FakeStoker("leader")
    val server = NettyServerBuilder.forAddress(new InetSocketAddress("127.0.0.1", 0))
      .addService(fake).build().start()
    val master = StokerMaster.parse(s"stoker://127.0.0.1:$closed,127.0.0.1:${server.getPort}")
    val channel = NettyChannelBuilder.forTarget(master.grpcTarget).usePlaintext().build()
    try {
      val reply = ExecutorAllocatorGrpc.newBlockingStub(channel)
        .withDeadlineAfter(10, TimeUnit.SECONDS)
        .registerApplication(RegisterApplicationRequest.newBuilder().setAppId("a").setToken("t").build())
      eq("leader", reply.getIncarnation)
      eq(Seq("register"), fake.callsSeen)
    } finally {
      channel.shutdownNow().awaitTermination(10, TimeUnit.SECONDS)
      server.shutdownNow().awaitTermination(10, TimeUnit.SECONDS)
    }
  }

  @Test def canCreateOnlyForStokerSchemes(): Unit = {
    val cm = new StokerClusterManager
    check(cm.canCreate("spark+stoker://h:1"), "spark+stoker")
    check(cm.canCreate("stoker://h:1"), "stoker")
    check(cm.canCreate("stoker://h"), "a bad stoker URL is still ours, to fail with a clear error")
    check(!cm.canCreate("spark://h:7077"), "standalone")
    check(!cm.canCreate("k8s://https://h:443"), "k8s")
    check(!cm.canCreate("local[2]"), "local")
    check(!cm.canCreate("yarn"), "yarn")
    check(!cm.canCreate(null), "null")
  }

  @Test def badUrlsGiveClearErrors(): Unit = {
    val cases = Seq(
      "stoker://host" -> "missing port",
      "spark+stoker://:7077" -> "host",
      "stoker://host:0" -> "out of range",
      "stoker://host:99999" -> "out of range",
      "stoker://host:7077/path" -> "unexpected path",
      "stoker://user@host:7077" -> "user information",
      "stoker://host:7077?x=1" -> "query",
      "stoker://ho st:7077" -> "Invalid stoker master URL",
      "spark://host:7077" -> "unknown scheme")
    cases.foreach { case (url, expected) =>
      val e = intercept[IllegalArgumentException](StokerMaster.parse(url))
      check(e.getMessage.contains(expected), s"$url: '${e.getMessage}' should mention '$expected'")
      check(e.getMessage.contains("expected spark+stoker://host:port[,host:port...] or stoker://host:port"),
        s"$url: '${e.getMessage}' should say what is expected")
      check(e.getMessage.contains(url), s"$url: the message should quote the URL")
    }
    // The cluster manager turns it into a SparkException (shown as is by SparkContext).
    val e = intercept[SparkException](StokerClusterManager.parseMaster("stoker://nohost"))
    check(e.getMessage.contains("missing port"), e.getMessage)
  }

  @Test def settingsFromConf(): Unit = {
    eq(StokerSettings(), StokerSettings.fromConf(new SparkConf(false)))
    val conf = new SparkConf(false)
      .set("spark.stoker.registration.timeout", "2min")
      .set("spark.stoker.rpc.timeout", "1500ms")
      .set("spark.stoker.rpc.retryTimeout", "10s")
      .set("spark.stoker.unregister.timeout", "3s")
      .set("spark.stoker.reconnect.initialBackoff", "50ms")
      .set("spark.stoker.reconnect.maxBackoff", "2s")
      .set("spark.stoker.heartbeat.interval", "4s")
    eq(StokerSettings(120000L, 1500L, 10000L, 3000L, 50L, 2000L, Some(4000L)),
      StokerSettings.fromConf(conf))
    val e = intercept[SparkException](StokerSettings.fromConf(
      new SparkConf(false).set("spark.stoker.rpc.timeout", "0s")))
    check(e.getMessage.contains("spark.stoker.rpc.timeout"), e.getMessage)
    val e2 = intercept[SparkException](StokerSettings.fromConf(
      new SparkConf(false).set("spark.stoker.rpc.timeout", "soon")))
    check(e2.getMessage.contains("spark.stoker.rpc.timeout"), e2.getMessage)
  }

  @Test def appIds(): Unit = {
    val generated = StokerSchedulerBackend.generateAppId()
    check(generated.matches("stoker-[0-9]+-[0-9a-f]{8}"), generated)
    check(StokerSchedulerBackend.isValidAppId(generated), generated)
    check(StokerSchedulerBackend.generateAppId() != generated, "ids must differ")
    eq("my-app.1_x", StokerSchedulerBackend.chooseAppId(Some("my-app.1_x")))
    check(StokerSchedulerBackend.chooseAppId(Some("bad id/with slash")).startsWith("stoker-"),
      "an invalid spark.app.id is replaced")
    check(StokerSchedulerBackend.chooseAppId(Some("x" * 64)).startsWith("stoker-"), "too long")
    eq("x" * 63, StokerSchedulerBackend.chooseAppId(Some("x" * 63)))
    check(StokerSchedulerBackend.chooseAppId(Some("-app-")).startsWith("stoker-"),
      "alphanumeric at both ends")
    eq("spark-application-1700000000000",
      StokerSchedulerBackend.chooseAppId(Some("spark-application-1700000000000")))
    check(StokerSchedulerBackend.chooseAppId(None).startsWith("stoker-"), "none")
    val token = StokerSession.newToken()
    check(token.matches("[0-9a-f]{64}"), token)
  }
}
