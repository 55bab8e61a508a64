package org.apache.spark.scheduler.cluster.stoker

import java.util.UUID
import java.util.concurrent.ConcurrentLinkedQueue
import java.util.concurrent.atomic.AtomicReference

import scala.concurrent.Await
import scala.concurrent.duration._
import scala.jdk.CollectionConverters._

import dev.stoker.proto.v1._
import io.grpc.{ManagedChannel, Status}
import io.grpc.inprocess.InProcessChannelBuilder
import org.junit.jupiter.api.{AfterEach, Test}

import org.apache.spark.SparkException
import org.apache.spark.scheduler.{ExecutorDecommission, ExecutorExited, ExecutorLossReason}

class StokerSessionTest extends Checks {
  import Events._
  import ExecutorState._
  import ExitReason._

  private val name = "stoker-test-" + UUID.randomUUID()
  private val server = new FakeStokerServer(name)
  private val channel: ManagedChannel = InProcessChannelBuilder.forName(name).build()
  private val removed = new ConcurrentLinkedQueue[(String, ExecutorLossReason)]()
  private val failures = new ConcurrentLinkedQueue[String]()
  private val reclaims = new ConcurrentLinkedQueue[StokerReclaim.Request]()
  @volatile private var driverIds: Seq[String] = Nil
  private val templateRef = new AtomicReference[ExecutorTemplate](template(0))
  private var session: StokerSession = null

  private val fast = StokerSettings(
    registrationTimeoutMs = 5000, rpcTimeoutMs = 1000, retryTimeoutMs = 5000,
    unregisterTimeoutMs = 1000, initialBackoffMs = 10, maxBackoffMs = 100)

  private val driver = new StokerDriver {
    override def driverExecutorIds(): Seq[String] = driverIds
    override def removeExecutor(id: String, reason: ExecutorLossReason): Unit =
      removed.add(id -> reason)
    override def applicationFailed(message: String): Unit = failures.add(message)
    override def reclaim(request: StokerReclaim.Request): Unit = reclaims.add(request)
  }

  private def template(profileIds: Int*): ExecutorTemplate =
    ExecutorTemplate.newBuilder().setDriverUrl("spark://CoarseGrainedScheduler@d:1")
      .addAllProfiles(profileIds.map(id => ResourceProfile.newBuilder().setId(id).setCores(1)
        .setHeapMib(1024).setOverheadMib(384).build()).asJava)
      .build()

  private def newSession(settings: StokerSettings = fast): StokerSession = {
    session = new StokerSession(channel, name, "app-1", "demo", StokerSession.newToken(),
      () => templateRef.get(), FailurePolicy.newBuilder().setMaxFailures(3).build(), driver,
      settings)
    session
  }

  private def removedIds: Seq[String] = removed.asScala.map(_._1).toSeq

  @AfterEach def tearDown(): Unit = {
    if (session != null) session.stop()
    server.stop()
    channel.shutdownNow()
  }

  @Test def registersWithItsOwnTokenAndTemplate(): Unit = {
    val stoker = server.start(new FakeStoker("inc-1", leaseTtlMs = 300))
    val s = newSession()
    s.start(Map(0 -> 2))
    val reg = stoker.registrationsSeen.head
    eq("app-1", reg.getAppId)
    eq("demo", reg.getAppName)
    check(reg.getToken.matches("[0-9a-f]{64}"), s"the driver's own token: ${reg.getToken}")
    eq(s.currentToken, reg.getToken)
    eq(templateRef.get(), reg.getTemplate)
    eq(Seq(0 -> 2L), reg.getInitialTargetsList.asScala.map(t => t.getResourceProfileId -> t.getTotal).toSeq)
    eq(0L, reg.getLastExecutorId)
    eq(0, reg.getKnownExecutorIdsCount)
    eq(3, reg.getFailurePolicy.getMaxFailures)
    eq(Some("inc-1"), s.currentIncarnation)
    check(s.isAttached, "attached")
    eventually("watching from 0")(stoker.watchesSeen.map(_.getAfterSeq) == Seq(0L))
    // lease TTL 300 ms: a heartbeat every 100 ms.
    eventually("heartbeats")(stoker.heartbeatsSeen.size >= 3)
    eq(reg.getToken, stoker.heartbeatsSeen.head.getToken)
  }

  @Test def eventsBecomeOneRemovalPerExecutor(): Unit = {
    val stoker = server.start(new FakeStoker("inc-1", leaseTtlMs = 300))
    newSession().start(Map(0 -> 2))
    eventually("watching")(stoker.activeWatchers == 1)
    stoker.emit(executor("1", EXECUTOR_STATE_REQUESTED))
    stoker.emit(executor("1", EXECUTOR_STATE_RUNNING, host = "h1"))
    stoker.emit(executor("2", EXECUTOR_STATE_REQUESTED))
    val oom = stoker.emit(exited("1", EXIT_REASON_OOM_KILLED, Some(137), "OOMKilled",
      causedByApp = true))
    // The same terminal event delivered twice, and a second terminal event for the same id.
    stoker.resend(exited("1", EXIT_REASON_OOM_KILLED, Some(137), seqNo = oom))
    stoker.emit(exited("1", EXIT_REASON_LOST))
    val last = stoker.emit(exited("2", EXIT_REASON_DECOMMISSIONED))
    eventually("events handled")(session.lastHandledSeq == last)
    eq(2L, session.maxExecutorId)
    // Events are handled in order on one thread: once a later one is taken, every earlier one
    // has been acted on (this one, a third terminal event for 2, must change nothing).
    val marker = stoker.emit(exited("2", EXIT_REASON_LOST))
    eventually("a later event handled")(session.lastHandledSeq == marker)
    eq(Seq("1", "2"), removedIds, "each executor exactly once")
    removed.asScala.toSeq match {
      case Seq((_, ExecutorExited(137, true, msg)), (_, d: ExecutorDecommission)) =>
        check(msg.contains("OOM_KILLED"), msg)
        check(d.reason.contains("DECOMMISSIONED"), d.reason)
      case other => throw new AssertionError(s"unexpected $other")
    }
    eventually("acked in a heartbeat")(stoker.heartbeatsSeen.exists(_.getAckedSeq >= last))

    stoker.emit(app(ApplicationEvent.Kind.KIND_FAILED, "too many failures"))
    stoker.emit(app(ApplicationEvent.Kind.KIND_FAILED, "again"))
    val after = stoker.emit(app(ApplicationEvent.Kind.KIND_FAILED, "and again"))
    eventually("the later events handled")(session.lastHandledSeq == after && failures.size >= 1)
    eq(Seq("stoker failed the application: too many failures"), failures.asScala.toSeq)
  }

  @Test def startingExecutorsAreThoseNotRegisteredNotExitedAndNotAskedToGo(): Unit = {
    val stoker = server.start(new FakeStoker("inc-1", leaseTtlMs = 300))
    val s = newSession()
    s.start(Map(0 -> 4, 1 -> 1))
    eventually("watching")(stoker.activeWatchers == 1)
    stoker.emit(executor("1", EXECUTOR_STATE_RUNNING))
    stoker.emit(executor("2", EXECUTOR_STATE_REQUESTED))
    stoker.emit(executor("3", EXECUTOR_STATE_REQUESTED))
    stoker.emit(executor("4", EXECUTOR_STATE_REQUESTED))
    stoker.emit(executor("5", EXECUTOR_STATE_REQUESTED, profile = 1))
    val last = stoker.emit(exited("3", EXIT_REASON_LOST))
    eventually("events handled")(s.lastHandledSeq == last)
    eq(Seq("2", "4"), s.startingExecutorsOf(0, Set("1")).sorted,
      "1 registered with the driver, 3 exited, 5 of another profile")
    Await.result(s.kill(Seq("4")), 5.seconds)
    Await.result(s.decommission(Seq("2")), 5.seconds)
    eq(Nil, s.startingExecutorsOf(0, Set("1")), "asked to go: not chosen again")
    eq(Seq("5"), s.startingExecutorsOf(1, Set.empty))
  }

  @Test def aReclaimReachesTheDriverOnceOnTheStreamsThread(): Unit = {
    val stoker = server.start(new FakeStoker("inc-1", leaseTtlMs = 300))
    newSession().start(Map(0 -> 4))
    eventually("watching")(stoker.activeWatchers == 1)
    val ev = WatchEvent.newBuilder().setReclaim(ReclaimEvent.newBuilder()
      .setResourceProfileId(0).setCount(2).setTimeoutMs(60000)
      .setDeadlineUnixMs(System.currentTimeMillis() + 60000)
      .setReason("over its fair share in queue default")).build()
    val seq = stoker.emit(ev)
    stoker.resend(ev.toBuilder.setSeq(seq).build())
    // A later event, handled after the repeated one on the same thread: once it is, the repeat
    // has been seen and must not have been acted on.
    val later = stoker.emit(ev.toBuilder.setReclaim(ev.getReclaim.toBuilder.setCount(3)).build())
    eventually("handled")(session.lastHandledSeq == later && reclaims.size == 2)
    eq(Seq(2, 3), reclaims.asScala.toSeq.map(_.count), "a repeated event is not acted on twice")
    eq((0, 2, "over its fair share in queue default"),
      reclaims.asScala.head match { case r => (r.profileId, r.count, r.reason) })
  }

  @Test def requestsAreSentInOrderWithoutAdjustingTargets(): Unit = {
    val stoker = server.start(new FakeStoker("inc-1"))
    val s = newSession()
    s.start(Map(0 -> 4))
    val f1 = s.requestTotals(Map(0 -> 2), templateChanged = false)
    val f2 = s.kill(Seq("1", "2"))
    val f3 = s.decommission(Seq("3"))
    val f4 = s.requestTotals(Map(0 -> 5), templateChanged = false)
    Seq(f1, f2, f3, f4).foreach(f => eq(true, Await.result(f, 5.seconds)))
    eq(Seq("totals 0=2", "kill 1,2", "decommission 3", "totals 0=5"),
      stoker.callsSeen.filterNot(c => c == "register" || c.startsWith("watch")))
    eq(false, stoker.snapshot(stoker.kills.head.getAdjustTarget))
    eq(false, stoker.snapshot(stoker.decommissions.head.getAdjustTarget))
    eq(Map(0 -> 5), s.desiredTotalsSnapshot)
  }

  @Test def requestsNeverBlockAndWaitForStokerToComeBack(): Unit = {
    val first = server.start(new FakeStoker("inc-1"))
    val s = newSession()
    s.start(Map(0 -> 1))
    eventually("watching")(first.activeWatchers == 1)
    server.stop()
    val t0 = System.nanoTime()
    val f1 = s.requestTotals(Map(0 -> 3), templateChanged = false)
    val f2 = s.kill(Seq("7"))
    // Blocking calls would never return: stoker comes back only after this check.
    check(System.nanoTime() - t0 < 2000L * 1000 * 1000, "requests return at once")
    eventually("the session to notice stoker is gone")(!s.isAttached)
    check(!f1.isCompleted && !f2.isCompleted, "they wait for stoker, in order")
    // stoker comes back as a new incarnation that forgot the application.
    val second = server.start(new FakeStoker("inc-2"))
    eq(true, Await.result(f1, 10.seconds))
    eq(true, Await.result(f2, 10.seconds))
    val reg = second.registrationsSeen.head
    eq(Seq(0 -> 3L), reg.getInitialTargetsList.asScala.map(t => t.getResourceProfileId -> t.getTotal).toSeq,
      "re-registered with the totals the driver wants now")
    check(second.callsSeen.contains("kill 7"), second.callsSeen.toString)
  }

  @Test def givesUpAfterTheRetryTimeout(): Unit = {
    server.start(new FakeStoker("inc-1"))
    val s = newSession(fast.copy(retryTimeoutMs = 300))
    s.start(Map(0 -> 1))
    server.stop()
    eq(false, Await.result(s.requestTotals(Map(0 -> 2), templateChanged = false), 5.seconds))
    eq(Map(0 -> 2), s.desiredTotalsSnapshot, "still wanted: sent on re-registration")
  }

  @Test def reattachesToARestartedStokerWithTheSameToken(): Unit = {
    val first = server.start(new FakeStoker("inc-1", leaseTtlMs = 300))
    val s = newSession()
    s.start(Map(0 -> 2))
    eventually("watching")(first.activeWatchers == 1)
    first.emit(executor("1", EXECUTOR_STATE_RUNNING, host = "h1"))
    first.emit(executor("2", EXECUTOR_STATE_REQUESTED))
    val last = first.emit(executor("3", EXECUTOR_STATE_REQUESTED))
    eventually("handled")(s.lastHandledSeq == last)
    driverIds = Seq("1")
    val token = s.currentToken

    server.stop()
    val second = server.start(new FakeStoker("inc-2", leaseTtlMs = 300))
    eventually("re-registered")(second.registrationsSeen.nonEmpty)
    val reg = second.registrationsSeen.head
    eq(token, reg.getToken, "the same token")
    eq("app-1", reg.getAppId)
    eq(3L, reg.getLastExecutorId)
    eq(Set("1", "2", "3"), reg.getKnownExecutorIdsList.asScala.toSet,
      "the driver's executors and those stoker reported that have not exited")
    eq(Seq(0 -> 2L), reg.getInitialTargetsList.asScala.map(t => t.getResourceProfileId -> t.getTotal).toSeq)
    eventually("watching the new incarnation from 0")(second.watchesSeen.map(_.getAfterSeq) == Seq(0L))
    eq(Some("inc-2"), s.currentIncarnation)

    // The new incarnation reports the executor it no longer has: seq 1 again, handled.
    second.emit(exited("2", EXIT_REASON_LOST, message = "stoker restarted"))
    eventually("lost executor removed")(removedIds == Seq("2"))
    eventually("heartbeats to the new stoker")(second.heartbeatsSeen.nonEmpty)
  }

  @Test def resumesAfterTheLastSeqWhenTheIncarnationIsUnchanged(): Unit = {
    val stoker = server.start(new FakeStoker("inc-1"))
    val s = newSession()
    s.start(Map(0 -> 1))
    eventually("watching")(stoker.activeWatchers == 1)
    stoker.emit(executor("1", EXECUTOR_STATE_REQUESTED))
    val last = stoker.emit(executor("1", EXECUTOR_STATE_RUNNING))
    eventually("handled")(s.lastHandledSeq == last)
    stoker.breakStreams(Status.UNAVAILABLE.withDescription("connection reset"))
    eventually("re-registered")(stoker.registrationsSeen.size == 2)
    eventually("watching again")(stoker.watchesSeen.map(_.getAfterSeq) == Seq(0L, last))
    eq(stoker.registrationsSeen.head.getToken, stoker.registrationsSeen(1).getToken)
    eq(Seq("1"), stoker.registrationsSeen(1).getKnownExecutorIdsList.asScala.toSeq)
    stoker.emit(exited("1", EXIT_REASON_ERROR, Some(1)))
    eventually("removal after resume")(removedIds == Seq("1"))
  }

  @Test def aNewIncarnationInAHeartbeatTriggersReattachment(): Unit = {
    val stoker = server.start(new FakeStoker("inc-1", leaseTtlMs = 300))
    val s = newSession()
    s.start(Map(0 -> 1))
    eventually("watching")(stoker.activeWatchers == 1)
    stoker.heartbeatIncarnation = Some("inc-X")
    eventually("re-registered after the heartbeat")(stoker.registrationsSeen.size >= 2)
  }

  @Test def pendingKillsAreSentAgainAfterReattaching(): Unit = {
    val first = server.start(new FakeStoker("inc-1"))
    val s = newSession()
    s.start(Map(0 -> 2))
    eq(true, Await.result(s.kill(Seq("4", "5")), 5.seconds))
    first.emit(exited("4", EXIT_REASON_KILLED_BY_DRIVER, Some(143)))
    eventually("4 removed")(removedIds == Seq("4"))
    server.stop()
    val second = server.start(new FakeStoker("inc-2"))
    eventually("kill of 5 sent again")(second.callsSeen.contains("kill 5"))
  }

  @Test def newResourceProfileReRegistersWithTheFullTemplate(): Unit = {
    val stoker = server.start(new FakeStoker("inc-1"))
    val s = newSession()
    s.start(Map(0 -> 1))
    eventually("watching")(stoker.activeWatchers == 1)
    templateRef.set(template(0, 1))
    eq(true, Await.result(s.requestTotals(Map(0 -> 1, 1 -> 3), templateChanged = true), 5.seconds))
    val regs = stoker.registrationsSeen
    eq(2, regs.size)
    eq(regs.head.getToken, regs(1).getToken, "idempotent: same app id and token")
    eq(Seq(0, 1), regs(1).getTemplate.getProfilesList.asScala.map(_.getId).toSeq)
    eq(Seq(0 -> 1L, 1 -> 3L),
      regs(1).getInitialTargetsList.asScala.map(t => t.getResourceProfileId -> t.getTotal).toSeq)
    // An event sent now reaches the driver on the stream it already had.
    val seq = stoker.emit(executor("1", EXECUTOR_STATE_REQUESTED))
    eventually("handled")(s.lastHandledSeq == seq)
    eq(1, stoker.watchesSeen.size, "the event stream goes on: same incarnation")
    check(s.isAttached, "attached")
  }

  @Test def registrationFailsFastWhenRefused(): Unit = {
    val stoker = server.start(new FakeStoker("inc-1"))
    stoker.registerFailure = Some(Status.INVALID_ARGUMENT.withDescription(
      "template.profiles[0].cores: 0 is not positive"))
    val t0 = System.nanoTime()
    val e = intercept[SparkException](newSession().start(Map(0 -> 1)))
    check(System.nanoTime() - t0 < 3000L * 1000 * 1000, "no retries")
    check(e.getMessage.contains("refused to register application app-1"), e.getMessage)
    check(e.getMessage.contains("INVALID_ARGUMENT: template.profiles[0].cores"), e.getMessage)
  }

  @Test def registrationGivesUpAfterTheTimeoutWhenStokerIsUnreachable(): Unit = {
    val t0 = System.nanoTime()
    val e = intercept[SparkException](
      newSession(fast.copy(registrationTimeoutMs = 500)).start(Map(0 -> 1)))
    val tookMs = (System.nanoTime() - t0) / 1000000
    check(tookMs >= 300 && tookMs < 5000, s"took $tookMs ms")
    check(e.getMessage.contains("Could not register application app-1 with stoker"), e.getMessage)
    check(e.getMessage.contains("UNAVAILABLE"), e.getMessage)
    check(e.getMessage.contains("spark.stoker.registration.timeout"), e.getMessage)
  }

  @Test def registrationRetriesUntilStokerAppears(): Unit = {
    val s = newSession()
    val starter = new Thread(() => {
      Thread.sleep(300)
      server.start(new FakeStoker("inc-1"))
    })
    starter.start()
    s.start(Map(0 -> 1))
    starter.join()
    eq(1, server.stoker.registrationsSeen.size)
    check(s.isAttached, "attached")
  }

  @Test def stopReleasesTargetsAndUnregisters(): Unit = {
    val stoker = server.start(new FakeStoker("inc-1"))
    val s = newSession()
    s.start(Map(0 -> 3, 2 -> 1))
    s.stop()
    s.releaseTargets()
    s.unregister()
    val calls = stoker.callsSeen.filterNot(c => c == "register" || c.startsWith("watch"))
    eq(Seq("totals 0=0,2=0", "unregister"), calls)
    eq(false, Await.result(s.requestTotals(Map(0 -> 1), templateChanged = false), 1.second),
      "nothing is sent after stop")
  }
}
