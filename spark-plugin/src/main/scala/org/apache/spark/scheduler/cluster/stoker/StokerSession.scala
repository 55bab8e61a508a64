/*
 * stoker: a cluster manager that gives Spark executors.
 */
package org.apache.spark.scheduler.cluster.stoker

import java.security.SecureRandom
import java.util.concurrent.{ConcurrentHashMap, ExecutorService, RejectedExecutionException, ScheduledExecutorService, ThreadLocalRandom, TimeUnit}
import java.util.concurrent.atomic.{AtomicBoolean, AtomicReference}

import scala.concurrent.{Future, Promise}
import scala.jdk.CollectionConverters._
import scala.util.control.NonFatal

import dev.stoker.proto.v1._
import io.grpc.{Context, ManagedChannel, Status, StatusRuntimeException}

import org.apache.spark.SparkException
import org.apache.spark.internal.Logging
import org.apache.spark.scheduler.{ExecutorExited, ExecutorLossReason}
import org.apache.spark.util.ThreadUtils

/** What the session needs from the Spark side (the scheduler backend, or a test). */
private[spark] trait StokerDriver {
  /** The executors currently registered with the driver. */
  def driverExecutorIds(): Seq[String]
  /** Reports a lost executor to Spark; called once per executor. Must not block. */
  def removeExecutor(executorId: String, reason: ExecutorLossReason): Unit
  /** stoker failed the application; called at most once. */
  def applicationFailed(message: String): Unit
}

/**
 * One application's conversation with stoker: registration, the ordered queue of requests made
 * by Spark, the event stream, the lease heartbeat, and re-attachment after any failure.
 *
 * Threads:
 *  - `stoker-requests`: ONE thread that sends, in the order Spark made them, the totals, kills,
 *    decommissions and template updates, each retried while stoker is unreachable (bounded by
 *    spark.stoker.rpc.retryTimeout). Callers get a Future at once and never block.
 *  - `stoker-watch`: runs WatchExecutors and is the supervisor of the connection: when the stream
 *    or a heartbeat fails it backs off (jittered, exponential), re-registers with the same app id
 *    and token and resumes the stream (from the last handled sequence number, or from 0 when
 *    stoker's incarnation changed).
 *  - `stoker-heartbeat`: renews the lease every third of its TTL.
 */
private[spark] class StokerSession(
    channel: ManagedChannel,
    target: String,
    val appId: String,
    appName: String,
    initialToken: String,
    template: () => ExecutorTemplate,
    failurePolicy: FailurePolicy,
    driver: StokerDriver,
    settings: StokerSettings,
    queue: String = "",
    minExecutors: Int = 0) extends Logging {

  import StokerSession._

  private val blocking = {
    val stub = ExecutorAllocatorGrpc.newBlockingStub(channel)
    settings.auth.fold(stub)(token => stub.withInterceptors(StokerAuth.interceptor(token)))
  }
  private def stub(timeoutMs: Long = settings.rpcTimeoutMs) =
    blocking.withDeadlineAfter(timeoutMs, TimeUnit.MILLISECONDS)

  // ---- state guarded by `lock` --------------------------------------------------------------
  private val lock = new Object
  private var token: String = initialToken
  private var incarnation: String = null
  private var leaseTtlMs: Long = 0L
  /** True while the session is attached; false while re-attaching. */
  private var registered = false
  private var everRegistered = false
  /** Changes whenever the event stream must be (re)opened: a re-registration by the supervisor,
   *  or a new incarnation seen by anyone. Events of a stream of an older epoch are dropped. */
  private var epoch = 0L
  /** The highest event sequence number handled. */
  private var lastSeq = 0L
  private val tracker = new StokerExecutorTracker

  // ---- state safe without the lock ---------------------------------------------------------
  private val desiredTotals = new ConcurrentHashMap[Int, Int]()
  private val pendingKills = ConcurrentHashMap.newKeySet[String]()
  private val pendingDecommissions = ConcurrentHashMap.newKeySet[String]()
  private val stopped = new AtomicBoolean(false)
  private val appFailed = new AtomicBoolean(false)
  private val currentWatch = new AtomicReference[Context.CancellableContext]()

  private val requests: ExecutorService =
    ThreadUtils.newDaemonSingleThreadExecutor("stoker-requests")
  private val heartbeats: ScheduledExecutorService =
    ThreadUtils.newDaemonSingleThreadScheduledExecutor("stoker-heartbeat")
  @volatile private var watchThread: Thread = null

  // ---- accessors (logging and tests) -------------------------------------------------------
  def currentToken: String = lock.synchronized(token)
  def currentIncarnation: Option[String] = lock.synchronized(Option(incarnation))
  def lastHandledSeq: Long = lock.synchronized(lastSeq)
  def isAttached: Boolean = lock.synchronized(registered)
  def desiredTotalsSnapshot: Map[Int, Int] = desiredTotals.asScala.toMap
  def maxExecutorId: Long = lock.synchronized(tracker.maxExecutorId)
  def liveExecutorIds: Seq[String] = lock.synchronized(tracker.liveExecutorIds)

  // ---- lifecycle ---------------------------------------------------------------------------

  /**
   * Registers the application, retrying while stoker is unreachable for up to
   * spark.stoker.registration.timeout, then starts the event stream and the heartbeat.
   * Throws a SparkException that says what went wrong when registration fails.
   */
  def start(initialTargets: Map[Int, Int]): Unit = {
    initialTargets.foreach { case (p, n) => desiredTotals.put(p, n) }
    registerAtStart()
    val t = new Thread(() => watchLoop(), "stoker-watch")
    t.setDaemon(true)
    watchThread = t
    t.start()
    scheduleHeartbeat(heartbeatIntervalMs)
  }

  private def registerAtStart(): Unit = {
    val timeoutMs = settings.registrationTimeoutMs
    val deadline = System.nanoTime() + TimeUnit.MILLISECONDS.toNanos(timeoutMs)
    var backoff = settings.initialBackoffMs
    var attempt = 0
    var lastError: StatusRuntimeException = null
    while (true) {
      if (stopped.get) throw new SparkException(s"stoker: stopped while registering $appId")
      attempt += 1
      val remainingMs = TimeUnit.NANOSECONDS.toMillis(deadline - System.nanoTime())
      try {
        val resp = stub(math.max(100L, math.min(settings.rpcTimeoutMs, remainingMs)))
          .registerApplication(registrationRequest())
        applyRegistration(resp, Registration.First)
        return
      } catch {
        case e: StatusRuntimeException if isTransient(e.getStatus.getCode) =>
          lastError = e
          logWarning(s"stoker at $target is not reachable yet (attempt $attempt to register " +
            s"application $appId): ${describe(e)}")
        case e: StatusRuntimeException =>
          throw new SparkException(s"stoker at $target refused to register application " +
            s"$appId: ${describe(e)}", e)
      }
      val leftMs = TimeUnit.NANOSECONDS.toMillis(deadline - System.nanoTime())
      if (leftMs <= backoff) {
        throw new SparkException(s"Could not register application $appId with stoker at " +
          s"$target within $timeoutMs ms ($attempt attempts; last error: " +
          s"${describe(lastError)}). Check that stoker is running and reachable from the " +
          s"driver at the master URL's host:port (${StokerSettings.RegistrationTimeout} sets " +
          "how long to wait).", lastError)
      }
      sleepQuietly(jitter(backoff))
      backoff = math.min(backoff * 2, settings.maxBackoffMs)
      channel.resetConnectBackoff()
    }
  }

  /** Stops the threads; pending requests complete with false. Idempotent. */
  def stop(): Unit = {
    if (!stopped.compareAndSet(false, true)) return
    lock.synchronized(lock.notifyAll())
    cancelWatch()
    heartbeats.shutdownNow()
    requests.shutdownNow().asScala.foreach {
      case op: StokerSession#Op => op.promise.trySuccess(false)
      case _ =>
    }
    try {
      requests.awaitTermination(2, TimeUnit.SECONDS)
      val t = watchThread
      if (t != null) t.join(2000)
    } catch {
      case _: InterruptedException => Thread.currentThread().interrupt()
    }
  }

  /**
   * Best effort, after [[stop]]: sets every profile's target to 0 so that executors leaving
   * during Spark's own shutdown are not replaced.
   */
  def releaseTargets(): Unit = {
    if (!lock.synchronized(everRegistered)) return
    val profiles = desiredTotals.keySet().asScala.toSeq.sorted
    if (profiles.isEmpty) return
    try {
      stub().requestTotalExecutors(RequestTotalExecutorsRequest.newBuilder()
        .setAppId(appId).setToken(currentToken)
        .addAllTargets(profiles.map(p => profileTarget(p, 0)).asJava)
        .build())
    } catch {
      case NonFatal(e) => logInfo(s"stoker: could not set the targets to 0 on stop: $e")
    }
  }

  /** After [[stop]]: removes the application and all its executors (bounded deadline). */
  def unregister(): Unit = {
    if (!lock.synchronized(everRegistered)) return
    try {
      val resp = stub(settings.unregisterTimeoutMs).unregisterApplication(
        UnregisterApplicationRequest.newBuilder().setAppId(appId).setToken(currentToken).build())
      logInfo(s"Unregistered application $appId from stoker at $target " +
        s"(${resp.getRemovedExecutors} executor(s) being removed)")
    } catch {
      case e: StatusRuntimeException =>
        logWarning(s"stoker: could not unregister application $appId from $target: " +
          s"${describe(e)}; its lease will expire and stoker will remove its executors then")
      case NonFatal(e) =>
        logWarning(s"stoker: could not unregister application $appId from $target", e)
    }
  }

  // ---- requests from Spark (never block) ---------------------------------------------------

  /**
   * Records the new desired totals and sends them in order. With `templateChanged` (a resource
   * profile appeared), re-registers instead: same app id and token, the full template and the
   * current totals; RegisterApplication is idempotent on app id + token, so this is how a
   * driver extends its template.
   */
  def requestTotals(totals: Map[Int, Int], templateChanged: Boolean): Future[Boolean] = {
    totals.foreach { case (p, n) => desiredTotals.put(p, n) }
    if (templateChanged) {
      enqueue("RegisterApplication (template update: new resource profile)") {
        val resp = stub().registerApplication(registrationRequest())
        applyRegistration(resp, Registration.TemplateUpdate)
      }
    } else {
      val targets = totals.toSeq.sortBy(_._1).map { case (p, n) => profileTarget(p, n) }
      enqueue(s"RequestTotalExecutors(${formatTotals(totals)})") {
        stub().requestTotalExecutors(RequestTotalExecutorsRequest.newBuilder()
          .setAppId(appId).setToken(currentToken).addAllTargets(targets.asJava).build())
      }
    }
  }

  /** Kills executors; adjust_target = false because Spark lowers its totals itself. */
  def kill(executorIds: Seq[String]): Future[Boolean] = {
    lock.synchronized {
      executorIds.filterNot(tracker.hasExited).foreach(pendingKills.add)
    }
    sendKill(executorIds, "")
  }

  /** Decommissions executors; adjust_target = false because Spark adjusts its totals itself. */
  def decommission(executorIds: Seq[String]): Future[Boolean] = {
    lock.synchronized {
      executorIds.filterNot(tracker.hasExited).foreach(pendingDecommissions.add)
    }
    sendDecommission(executorIds, "")
  }

  private def sendKill(ids: Seq[String], note: String): Future[Boolean] =
    enqueue(s"KillExecutors(${ids.mkString(", ")})$note") {
      val resp = stub().killExecutors(KillExecutorsRequest.newBuilder()
        .setAppId(appId).setToken(currentToken).addAllExecutorIds(ids.asJava)
        .setAdjustTarget(false).build())
      logDebug(s"stoker: killing ${resp.getKilledList.asScala.mkString(", ")}")
    }

  private def sendDecommission(ids: Seq[String], note: String): Future[Boolean] =
    enqueue(s"DecommissionExecutors(${ids.mkString(", ")})$note") {
      val resp = stub().decommissionExecutors(DecommissionExecutorsRequest.newBuilder()
        .setAppId(appId).setToken(currentToken).addAllExecutorIds(ids.asJava)
        .setAdjustTarget(false).build())
      logDebug(s"stoker: decommissioning ${resp.getDecommissioningList.asScala.mkString(", ")}")
    }

  private final class Op(val what: String, val deadlineNs: Long, val body: () => Unit)
    extends Runnable {
    val promise: Promise[Boolean] = Promise[Boolean]()
    override def run(): Unit = {
      val ok = try runWithRetry(this) catch {
        case NonFatal(e) =>
          logWarning(s"stoker: $what failed", e)
          false
      }
      promise.trySuccess(ok)
    }
  }

  private def enqueue(what: String)(body: => Unit): Future[Boolean] = {
    val op = new Op(what,
      System.nanoTime() + TimeUnit.MILLISECONDS.toNanos(settings.retryTimeoutMs), () => body)
    if (stopped.get) {
      op.promise.trySuccess(false)
    } else {
      try requests.execute(op) catch {
        case _: RejectedExecutionException => op.promise.trySuccess(false)
      }
    }
    op.promise.future
  }

  private def runWithRetry(op: Op): Boolean = {
    var backoff = settings.initialBackoffMs
    var attempt = 0
    while (!stopped.get) {
      val e = awaitAttached(op.deadlineNs)
      if (e < 0) {
        if (!stopped.get) {
          logWarning(s"stoker: gave up on ${op.what}: not attached to stoker at $target " +
            s"within ${settings.retryTimeoutMs} ms")
        }
        return false
      }
      attempt += 1
      try {
        op.body()
        return true
      } catch {
        case ex: StatusRuntimeException =>
          if (stopped.get) return false
          val code = ex.getStatus.getCode
          if (isReattach(code)) {
            requestReconnect(e, s"${op.what}: ${describe(ex)}")
          } else if (!isTransient(code)) {
            logWarning(s"stoker refused ${op.what}: ${describe(ex)}")
            return false
          }
          val leftNs = op.deadlineNs - System.nanoTime()
          if (leftNs <= TimeUnit.MILLISECONDS.toNanos(backoff)) {
            logWarning(s"stoker: gave up on ${op.what} after $attempt attempt(s): " +
              describe(ex))
            return false
          }
          logDebug(s"stoker: ${op.what} failed (${describe(ex)}); retrying")
      }
      sleepQuietly(jitter(backoff))
      backoff = math.min(backoff * 2, settings.maxBackoffMs)
      channel.resetConnectBackoff()
    }
    false
  }

  /** Waits until the session is attached; its epoch, or -1 at the deadline or on stop. */
  private def awaitAttached(deadlineNs: Long): Long = lock.synchronized {
    try {
      while (!registered && !stopped.get) {
        val waitMs = TimeUnit.NANOSECONDS.toMillis(deadlineNs - System.nanoTime())
        if (waitMs <= 0) return -1L
        lock.wait(waitMs)
      }
    } catch {
      case _: InterruptedException =>
        Thread.currentThread().interrupt()
        return -1L
    }
    if (stopped.get) -1L else epoch
  }

  // ---- registration ------------------------------------------------------------------------

  private def registrationRequest(): RegisterApplicationRequest = {
    // Ask the driver outside our lock: it takes the backend's lock.
    val driverIds = try driver.driverExecutorIds() catch {
      case NonFatal(e) =>
        logWarning("stoker: could not list the driver's executors", e)
        Nil
    }
    val (tok, lastId, known) = lock.synchronized {
      driverIds.foreach(tracker.noteExecutorId)
      val known = (driverIds ++ tracker.liveExecutorIds).distinct.filterNot(tracker.hasExited)
      (token, tracker.maxExecutorId, known)
    }
    val targets =
      desiredTotals.asScala.toSeq.sortBy(_._1).map { case (p, n) => profileTarget(p, n) }
    RegisterApplicationRequest.newBuilder()
      .setAppId(appId)
      .setAppName(appName)
      .setToken(tok)
      .setTemplate(template())
      .addAllInitialTargets(targets.asJava)
      .setLastExecutorId(lastId)
      .addAllKnownExecutorIds(known.asJava)
      .setFailurePolicy(failurePolicy)
      .setQueue(queue)
      .setMinExecutors(minExecutors)
      .build()
  }

  private def applyRegistration(resp: RegisterApplicationResponse, kind: Registration): Unit = {
    var previous: String = null
    var changed = false
    var resumeAfter = 0L
    var ttl = 0L
    lock.synchronized {
      if (resp.getToken.nonEmpty && resp.getToken != token) {
        if (everRegistered) {
          logWarning("stoker: the application token changed on re-registration; using the new one")
        }
        token = resp.getToken
      }
      previous = incarnation
      changed = previous != null && previous != resp.getIncarnation
      if (changed) lastSeq = 0L
      incarnation = resp.getIncarnation
      if (resp.getLeaseTtlMs > 0) leaseTtlMs = resp.getLeaseTtlMs
      if (kind == Registration.Reattach || changed) epoch += 1
      registered = true
      everRegistered = true
      resumeAfter = lastSeq
      ttl = leaseTtlMs
      lock.notifyAll()
    }
    val inc = resp.getIncarnation
    kind match {
      case Registration.First =>
        logInfo(s"Registered application $appId with stoker at $target (incarnation $inc, " +
          s"lease TTL $ttl ms)")
      case Registration.Reattach =>
        val how = if (changed) {
          s"stoker restarted (incarnation $previous -> $inc): watching its events from the start"
        } else {
          s"incarnation $inc, resuming events after seq $resumeAfter"
        }
        logInfo(s"re-attached to stoker at $target (application $appId, " +
          s"${if (resp.getReattached) "known" else "registered anew"}; $how)")
      case Registration.TemplateUpdate =>
        logInfo(s"stoker: sent the executor template with a new resource profile " +
          s"(${template().getProfilesCount} profiles)")
        if (changed) {
          logInfo(s"re-attached to stoker at $target (application $appId; stoker restarted: " +
            s"incarnation $previous -> $inc, watching its events from the start)")
          cancelWatch() // the supervisor reopens the stream for the new epoch
        }
    }
  }

  /** One re-registration attempt by the supervisor. */
  private def reRegister(): Boolean = {
    // gRPC's own reconnect backoff grows to minutes; ours (at most maxBackoff) governs.
    channel.resetConnectBackoff()
    try {
      val resp = stub().registerApplication(registrationRequest())
      applyRegistration(resp, Registration.Reattach)
      resendPending()
      true
    } catch {
      case e: StatusRuntimeException =>
        if (!stopped.get) {
          logWarning(s"stoker: could not re-attach to $target yet: ${describe(e)}")
        }
        false
    }
  }

  /** Kills and decommissions not yet seen to finish are sent again after a re-attachment. */
  private def resendPending(): Unit = {
    val (kills, decoms) = lock.synchronized {
      (pendingKills.asScala.filterNot(tracker.hasExited).toSeq.sorted,
        pendingDecommissions.asScala.filterNot(tracker.hasExited).toSeq.sorted)
    }
    if (kills.nonEmpty) sendKill(kills, " (again, after re-attaching)")
    if (decoms.nonEmpty) sendDecommission(decoms, " (again, after re-attaching)")
  }

  /** Marks the session detached (if `e` is still current) and ends the event stream. */
  private def requestReconnect(e: Long, why: String): Unit = {
    val changed = lock.synchronized {
      if (registered && epoch == e) {
        registered = false
        true
      } else {
        false
      }
    }
    if (changed && !stopped.get) {
      logWarning(s"stoker: lost the connection to $target ($why); re-attaching")
    }
    cancelWatch()
  }

  private def cancelWatch(): Unit = {
    val ctx = currentWatch.get()
    if (ctx != null) ctx.cancel(null)
  }

  // ---- the event stream (supervisor) -------------------------------------------------------

  private def watchLoop(): Unit = {
    var backoff = settings.initialBackoffMs
    while (!stopped.get) {
      try {
        val (e, after, attached) = lock.synchronized((epoch, lastSeq, registered))
        if (!attached) {
          if (!reRegister()) {
            sleepQuietly(jitter(backoff))
            backoff = math.min(backoff * 2, settings.maxBackoffMs)
          }
        } else {
          val startedNs = System.nanoTime()
          val outcome = runWatch(e, after)
          if (!stopped.get) {
            if (System.nanoTime() - startedNs > TimeUnit.SECONDS.toNanos(5)) {
              backoff = settings.initialBackoffMs
            }
            val reopenOnly = lock.synchronized(registered && epoch != e)
            if (!reopenOnly) {
              requestReconnect(e, s"event stream: $outcome")
              sleepQuietly(jitter(backoff))
              backoff = math.min(backoff * 2, settings.maxBackoffMs)
            }
          }
        }
      } catch {
        case NonFatal(t) =>
          logWarning("stoker: unexpected error in the event stream supervisor", t)
          sleepQuietly(jitter(backoff))
          backoff = math.min(backoff * 2, settings.maxBackoffMs)
      }
    }
  }

  /** Runs one WatchExecutors stream until it ends; says why it ended. */
  private def runWatch(e: Long, afterSeq: Long): String = {
    val ctx = Context.current().withCancellation()
    currentWatch.set(ctx)
    try {
      val current = lock.synchronized(registered && epoch == e)
      if (!current || stopped.get) return "superseded"
      val req = WatchExecutorsRequest.newBuilder()
        .setAppId(appId).setToken(currentToken).setAfterSeq(afterSeq).build()
      ctx.run { () =>
        val it = blocking.watchExecutors(req)
        while (it.hasNext) handleEvent(e, it.next())
      }
      "stoker closed the event stream"
    } catch {
      case ex: StatusRuntimeException => describe(ex)
      case NonFatal(ex) => ex.toString
    } finally {
      currentWatch.compareAndSet(ctx, null)
      ctx.cancel(null)
    }
  }

  private def handleEvent(e: Long, ev: WatchEvent): Unit = {
    val actions: Seq[StokerAction] = lock.synchronized {
      if (epoch != e) return // a stream of an older epoch
      val seq = ev.getSeq
      if (seq != 0 && seq <= lastSeq) return // already handled (a resumed stream)
      if (seq > lastSeq + 1) {
        logWarning(s"stoker: events ${lastSeq + 1} to ${seq - 1} of application $appId were " +
          "not received (forgotten by stoker)")
      }
      if (seq > lastSeq) lastSeq = seq
      val acts = tracker.handle(ev)
      acts.foreach {
        case StokerAction.RemoveExecutor(id, _) =>
          pendingKills.remove(id)
          pendingDecommissions.remove(id)
        case _ =>
      }
      acts
    }
    actions.foreach(perform)
  }

  private def perform(action: StokerAction): Unit = {
    try {
      action match {
        case StokerAction.RemoveExecutor(id, reason) =>
          reason match {
            case ExecutorExited(_, true, _) => logWarning(reason.message)
            case _ => logInfo(reason.message)
          }
          driver.removeExecutor(id, reason)
        case StokerAction.Info(m) => logInfo(m)
        case StokerAction.Warn(m) => logWarning(m)
        case StokerAction.FailApplication(m) =>
          if (appFailed.compareAndSet(false, true)) driver.applicationFailed(m)
      }
    } catch {
      case NonFatal(t) => logWarning(s"stoker: error while handling $action", t)
    }
  }

  // ---- heartbeat ---------------------------------------------------------------------------

  private def heartbeatIntervalMs: Long = {
    val ttl = lock.synchronized(leaseTtlMs)
    val third = if (ttl > 0) math.max(ttl / 3, 50L) else DefaultHeartbeatMs
    settings.heartbeatIntervalMs.map(math.min(_, third)).getOrElse(third)
  }

  private def scheduleHeartbeat(delayMs: Long): Unit = {
    if (stopped.get) return
    try {
      heartbeats.schedule(new Runnable {
        override def run(): Unit = heartbeat()
      }, delayMs, TimeUnit.MILLISECONDS)
    } catch {
      case _: RejectedExecutionException => // stopping
    }
  }

  private def heartbeat(): Unit = {
    try {
      val (attached, e, acked, tok, inc) =
        lock.synchronized((registered, epoch, lastSeq, token, incarnation))
      if (attached && !stopped.get) {
        val interval = heartbeatIntervalMs
        try {
          val resp = stub(math.min(settings.rpcTimeoutMs, math.max(interval, 1000L)))
            .heartbeat(HeartbeatRequest.newBuilder()
              .setAppId(appId).setToken(tok).setAckedSeq(acked).build())
          if (resp.getIncarnation.nonEmpty && resp.getIncarnation != inc) {
            requestReconnect(e, s"stoker restarted (incarnation $inc -> ${resp.getIncarnation})")
          } else if (resp.getLeaseTtlMs > 0) {
            lock.synchronized(if (epoch == e) leaseTtlMs = resp.getLeaseTtlMs)
          }
        } catch {
          case ex: StatusRuntimeException =>
            if (!stopped.get) requestReconnect(e, s"heartbeat failed: ${describe(ex)}")
        }
      }
    } catch {
      case NonFatal(t) => logWarning("stoker: heartbeat error", t)
    } finally {
      scheduleHeartbeat(heartbeatIntervalMs)
    }
  }

  // ---- helpers -----------------------------------------------------------------------------

  private def jitter(ms: Long): Long =
    math.max(1L, (ms * (0.5 + 0.5 * ThreadLocalRandom.current().nextDouble())).toLong)

  private def sleepQuietly(ms: Long): Unit = {
    if (stopped.get) return
    try Thread.sleep(ms) catch {
      case _: InterruptedException => Thread.currentThread().interrupt()
    }
  }
}

private[spark] object StokerSession {
  val DefaultHeartbeatMs = 10000L

  private sealed trait Registration
  private object Registration {
    case object First extends Registration
    case object Reattach extends Registration
    case object TemplateUpdate extends Registration
  }

  /** A fresh random token: 32 random bytes in hex (64 characters). */
  def newToken(): String = {
    val bytes = new Array[Byte](32)
    new SecureRandom().nextBytes(bytes)
    bytes.map(b => f"${b & 0xff}%02x").mkString
  }

  def profileTarget(profileId: Int, total: Int): ProfileTarget =
    ProfileTarget.newBuilder().setResourceProfileId(profileId).setTotal(total.toLong).build()

  def formatTotals(totals: Map[Int, Int]): String =
    totals.toSeq.sortBy(_._1).map { case (p, n) => s"profile $p: $n" }.mkString(", ")

  /** Worth retrying as is: stoker (or the way to it) is briefly unavailable. */
  def isTransient(code: Status.Code): Boolean = code match {
    case Status.Code.UNAVAILABLE | Status.Code.DEADLINE_EXCEEDED | Status.Code.ABORTED => true
    case _ => false
  }

  /** stoker does not know the application (it restarted) or no longer accepts the token:
   *  re-register, then retry. */
  def isReattach(code: Status.Code): Boolean = code match {
    case Status.Code.NOT_FOUND | Status.Code.PERMISSION_DENIED | Status.Code.UNAUTHENTICATED =>
      true
    case _ => false
  }

  def describe(e: StatusRuntimeException): String = {
    if (e == null) return "none"
    val s = e.getStatus
    val desc = Option(s.getDescription).filter(_.nonEmpty).map(d => s": $d").getOrElse("")
    val cause = Option(s.getCause).map(c => s" ($c)").getOrElse("")
    s"${s.getCode}$desc$cause"
  }
}
