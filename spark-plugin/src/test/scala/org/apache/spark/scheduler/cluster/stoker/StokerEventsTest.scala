package org.apache.spark.scheduler.cluster.stoker

import dev.stoker.proto.v1._
import org.junit.jupiter.api.Test

import org.apache.spark.scheduler.{ExecutorDecommission, ExecutorExited}

object Events {
  private var seq = 0L

  def executor(
      id: String,
      state: ExecutorState,
      reason: ExitReason = ExitReason.EXIT_REASON_UNSPECIFIED,
      exitCode: Option[Int] = None,
      message: String = "",
      causedByApp: Boolean = false,
      host: String = "",
      backendName: String = "",
      profile: Int = 0,
      seqNo: Long = -1): WatchEvent = {
    val e = ExecutorEvent.newBuilder()
      .setExecutorId(id).setState(state).setReason(reason).setMessage(message)
      .setCausedByApp(causedByApp).setHost(host).setBackendName(backendName)
      .setResourceProfileId(profile)
    exitCode.foreach(e.setExitCode)
    WatchEvent.newBuilder().setSeq(if (seqNo >= 0) seqNo else nextSeq()).setExecutor(e).build()
  }

  def exited(id: String, reason: ExitReason, code: Option[Int] = None, message: String = "",
      causedByApp: Boolean = false, seqNo: Long = -1): WatchEvent =
    executor(id, ExecutorState.EXECUTOR_STATE_EXITED, reason, code, message, causedByApp,
      seqNo = seqNo)

  def app(kind: ApplicationEvent.Kind, message: String, seqNo: Long = -1): WatchEvent =
    WatchEvent.newBuilder().setSeq(if (seqNo >= 0) seqNo else nextSeq())
      .setApplication(ApplicationEvent.newBuilder().setKind(kind).setMessage(message)).build()

  private def nextSeq(): Long = synchronized { seq += 1; seq }
}

class StokerEventsTest extends Checks {
  import Events._
  import ExecutorState._
  import ExitReason._

  private def removals(actions: Seq[StokerAction]): Seq[StokerAction.RemoveExecutor] =
    actions.collect { case r: StokerAction.RemoveExecutor => r }

  @Test def oomKillBecomesExecutorExitedWithAReadableMessage(): Unit = {
    val ev = executor("3", EXECUTOR_STATE_EXITED, EXIT_REASON_OOM_KILLED, Some(137),
      "Container exceeded its memory limit", causedByApp = true, host = "10.0.0.7",
      backendName = "app-exec-3")
    StokerEvents.lossReason(ev.getExecutor) match {
      case ExecutorExited(code, causedByApp, message) =>
        eq(137, code)
        eq(true, causedByApp)
        check(message.startsWith("stoker: executor 3 exited with code 137 (OOM_KILLED): " +
          "Container exceeded its memory limit"), message)
        check(message.contains("app-exec-3"), message)
        check(message.contains("spark.executor.memoryOverhead"), message)
      case other => throw new AssertionError(s"unexpected $other")
    }
  }

  @Test def exitWithoutCodeUsesMinusOneAndInfrastructureCausesAreNotTheApps(): Unit = {
    val ev = exited("12", EXIT_REASON_NODE_LOST, message = "node n1 stopped reporting")
    val r = StokerEvents.lossReason(ev.getExecutor).asInstanceOf[ExecutorExited]
    eq(-1, r.exitCode)
    eq(false, r.exitCausedByApp)
    eq("stoker: executor 12 exited with an unknown code (NODE_LOST): node n1 stopped reporting",
      r.reason)
    val killed = StokerEvents.lossReason(
      exited("4", EXIT_REASON_KILLED_BY_DRIVER, Some(143)).getExecutor)
      .asInstanceOf[ExecutorExited]
    eq(ExecutorExited(143, false, "stoker: executor 4 exited with code 143 (KILLED_BY_DRIVER)"),
      killed)
  }

  @Test def decommissionedBecomesExecutorDecommission(): Unit = {
    val ev = exited("5", EXIT_REASON_DECOMMISSIONED, Some(0), "decommission finished")
    StokerEvents.lossReason(ev.getExecutor) match {
      case d: ExecutorDecommission =>
        eq(None, d.workerHost)
        check(d.reason.contains("executor 5") && d.reason.contains("DECOMMISSIONED"), d.reason)
        check(d.message.startsWith(ExecutorDecommission.msgPrefix), d.message)
      case other => throw new AssertionError(s"unexpected $other")
    }
  }

  @Test def unknownReasonValuesAreNamed(): Unit = {
    val ev = ExecutorEvent.newBuilder().setExecutorId("1").setStateValue(4).setReasonValue(99)
      .build()
    eq("UNKNOWN_REASON_99", StokerEvents.reasonName(ev))
    check(StokerEvents.exitMessage(ev).contains("UNKNOWN_REASON_99"), StokerEvents.exitMessage(ev))
  }

  @Test def eachExecutorIsRemovedExactlyOnce(): Unit = {
    val t = new StokerExecutorTracker
    eq(Nil, removals(t.handle(executor("1", EXECUTOR_STATE_REQUESTED))))
    eq(Nil, removals(t.handle(executor("1", EXECUTOR_STATE_PENDING))))
    eq(Nil, removals(t.handle(executor("1", EXECUTOR_STATE_RUNNING, host = "h1"))))
    eq(Nil, removals(t.handle(executor("2", EXECUTOR_STATE_REQUESTED))))
    eq(Seq("1", "2"), t.liveExecutorIds)

    val first = removals(t.handle(exited("1", EXIT_REASON_ERROR, Some(1), causedByApp = true)))
    eq(Seq("1"), first.map(_.executorId))
    eq(ExecutorExited(1, true, "stoker: executor 1 exited with code 1 (ERROR)"), first.head.reason)
    eq(Nil, t.handle(exited("1", EXIT_REASON_ERROR, Some(1))), "a repeated terminal event")
    eq(Nil, t.handle(exited("1", EXIT_REASON_LOST)), "a later terminal event for the same id")
    eq(Nil, t.handle(executor("1", EXECUTOR_STATE_RUNNING)), "a late non-terminal event")
    eq(Seq("2"), t.liveExecutorIds)
    check(t.hasExited("1") && !t.hasExited("2"), "exited set")

    eq(Seq("2"), removals(t.handle(exited("2", EXIT_REASON_DECOMMISSIONED))).map(_.executorId))
    eq(Nil, t.handle(exited("2", EXIT_REASON_DECOMMISSIONED)))
    eq(Nil, t.liveExecutorIds)
    eq(2, t.exitedCount)
  }

  @Test def anExecutorNeverSeenBeforeItExitsIsRemovedToo(): Unit = {
    val t = new StokerExecutorTracker
    eq(Seq("9"), removals(t.handle(exited("9", EXIT_REASON_LOST))).map(_.executorId))
    eq(9L, t.maxExecutorId)
  }

  @Test def tracksTheHighestExecutorId(): Unit = {
    val t = new StokerExecutorTracker
    t.handle(executor("7", EXECUTOR_STATE_REQUESTED))
    t.handle(executor("3", EXECUTOR_STATE_REQUESTED))
    eq(7L, t.maxExecutorId)
    t.noteExecutorId("11")
    t.noteExecutorId("not-a-number")
    eq(11L, t.maxExecutorId)
    t.handle(exited("12", EXIT_REASON_START_FAILED))
    eq(12L, t.maxExecutorId)
  }

  @Test def applicationFailureOnceAndWarnings(): Unit = {
    val t = new StokerExecutorTracker
    eq(Seq(StokerAction.FailApplication("stoker failed the application: 7 executor failures")),
      t.handle(app(ApplicationEvent.Kind.KIND_FAILED, "7 executor failures")))
    eq(Nil, t.handle(app(ApplicationEvent.Kind.KIND_FAILED, "again")), "only once")
    eq(Seq(StokerAction.Warn("stoker: quota exceeded")),
      t.handle(app(ApplicationEvent.Kind.KIND_WARNING, "quota exceeded")))
    t.handle(executor("1", EXECUTOR_STATE_RUNNING, host = "h", backendName = "pod-1")) match {
      case Seq(StokerAction.Info(m)) =>
        eq("stoker: executor 1 is running on h (pod-1)", m)
      case other => throw new AssertionError(s"unexpected $other")
    }
    t.handle(WatchEvent.newBuilder().setSeq(99).build()) match {
      case Seq(StokerAction.Warn(m)) => check(m.contains("unknown kind"), m)
      case other => throw new AssertionError(s"unexpected $other")
    }
    t.handle(executor("", EXECUTOR_STATE_EXITED)) match {
      case Seq(StokerAction.Warn(m)) => check(m.contains("without executor id"), m)
      case other => throw new AssertionError(s"unexpected $other")
    }
  }
}
