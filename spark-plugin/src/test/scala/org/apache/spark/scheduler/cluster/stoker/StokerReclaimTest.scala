package org.apache.spark.scheduler.cluster.stoker

import dev.stoker.proto.v1._
import org.junit.jupiter.api.Test

class StokerReclaimTest extends Checks {
  import StokerReclaim.Load

  private val MiB = 1L << 20

  @Test def idleExecutorsGoFirstEvenWithMoreData(): Unit = {
    val loads = Seq(
      Load("1", runningTasks = 1, shuffleBytes = 0, cachedBytes = 0),
      Load("2", runningTasks = 0, shuffleBytes = 900 * MiB, cachedBytes = 0),
      Load("3", runningTasks = 4, shuffleBytes = 0, cachedBytes = 0),
      Load("4", runningTasks = 0, shuffleBytes = 10 * MiB, cachedBytes = 5 * MiB))
    eq(Seq("4", "2"), StokerReclaim.choose(loads, 2), "the idle ones, least data first")
    eq(Seq("4", "2", "1"), StokerReclaim.choose(loads, 3),
      "then the fewest running tasks: never a busy one while an idle one is left")
    eq(Seq("4", "2", "1", "3"), StokerReclaim.choose(loads, 10), "no more than there are")
    eq(Nil, StokerReclaim.choose(loads, 0))
  }

  @Test def executorsNotRegisteredYetGoBeforeIdleOnes(): Unit = {
    // A busy executor alone with the driver has no peer to migrate its blocks to: stopping one
    // that is still starting loses nothing.
    val loads = Seq(
      Load("1", runningTasks = 1, shuffleBytes = 0, cachedBytes = 0),
      StokerReclaim.starting("2"),
      Load("3", runningTasks = 0, shuffleBytes = 0, cachedBytes = 0),
      StokerReclaim.starting("4"))
    eq(Seq("4", "2"), StokerReclaim.choose(loads, 2), "the starting ones, newest first")
    eq(Seq("4", "2", "3", "1"), StokerReclaim.choose(loads, 4))
    eq(Seq("4 (not registered yet)", "3 (idle)", "1 (1 running task(s))"),
      Seq("4", "3", "1").map(id => loads.find(_.id == id).get.describe))
  }

  @Test def amongEqualExecutorsTheNewestGoesFirst(): Unit = {
    val loads = Seq("2", "10", "9").map(id => Load(id, 0, 0, 0))
    eq(Seq("10", "9"), StokerReclaim.choose(loads, 2))
  }

  @Test def aReclaimEventBecomesOneActionWithTheDriversMessage(): Unit = {
    val ev = WatchEvent.newBuilder().setSeq(7).setReclaim(ReclaimEvent.newBuilder()
      .setResourceProfileId(0).setCount(2).setTimeoutMs(60000).setDeadlineUnixMs(0)
      .setReason("over its fair share in queue etl")).build()
    val actions = new StokerExecutorTracker().handle(ev)
    actions match {
      case Seq(StokerAction.Reclaim(request)) =>
        eq(2, request.count)
        eq("stoker: give back 2 executors within 60 s (over its fair share in queue etl)",
          request.message)
      case other => throw new AssertionError(s"unexpected $other")
    }
    val withDeadline = StokerReclaim.Request(1, 1, 1700000000000L, 60000, "queue etl is at its max")
    check(withDeadline.message.matches(
      "stoker: give back 1 executor of resource profile 1 by \\d\\d:\\d\\d:\\d\\d " +
        "\\(queue etl is at its max\\)"), withDeadline.message)
  }
}
