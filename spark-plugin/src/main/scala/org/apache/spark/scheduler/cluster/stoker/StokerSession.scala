/*
 * stoker: a cluster manager that gives Spark executors.
 */
package org.apache.spark.scheduler.cluster.stoker

import java.security.SecureRandom
import java.util.concurrent.{ConcurrentHashMap, RejectedExecutionException, ScheduledExecutorService, TimeUnit}
import java.util.concurrent.atomic.AtomicBoolean

import scala.concurrent.Future
import scala.jdk.CollectionConverters._
import scala.util.control.NonFatal

import dev.stoker.proto.v1._
import io.grpc.{ManagedChannel, Status, StatusRuntimeException}

import org.apache.spark.SparkException
import org.apache.spark.internal.Logging
import org.apache.spark.scheduler.ExecutorLossReason
import org.apache.spark.util.ThreadUtils

/** What the session needs from the Spark side (the scheduler backend, or a test). */
private[spark] trait StokerDriver {
  /** The executors currently registered with the driver. */
  def driverExecutorIds(): Seq[String]
  /** Reports a lost executor to Spark; called once per executor. Must not block. */
  def removeExecutor(executorId: String, reason: ExecutorLossReason): Unit
  /** stoker failed the application; called at most once. */
  def applicationFailed(message: String): Unit
  /**
   * stoker asks for executors back (fair share): choose `request.count` executors of the
   * profile, idle ones first, and decommission them. Called on the event stream's thread, under
   * no lock of the session.
   */
  def reclaim(request: StokerReclaim.Request): Unit
}

/**
 * One application's conversation with stoker, put together from one class per job:
 *
 *  - [[StokerAttachment]]: the attachment state machine (token, incarnation, lease TTL, epoch,
 *    last handled event, the driver's view of stoker's executors), under one lock.
 *  - [[StokerRequests]]: `stoker-requests`, ONE thread that sends, in the order Spark made them,
 *    the totals, kills, decommissions and template updates, each retried while stoker is
 *    unreachable (bounded by spark.stoker.rpc.retryTimeout). Callers get a Future at once and
 *    never block.
 *  - [[StokerEventStream]]: `stoker-watch`, runs WatchExecutors and supervises the connection:
 *    when the stream or a heartbeat fails it backs off, re-registers with the same app id and
 *    token and resumes the stream (from the last handled sequence number, or from 0 when
 *    stoker's incarnation changed).
 *  - [[StokerBackoff]]: the one jittered exponential backoff all of them use.
 *
 * This class registers the application, builds the requests, and renews the lease
 * (`stoker-heartbeat`, every third of its TTL).
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

  private val stopped = new AtomicBoolean(false)
  private val isStopped: () => Boolean = () => stopped.get

  private val attachment = new StokerAttachment(initialToken)
  private val desiredTotals = new ConcurrentHashMap[Int, Int]()
  /** Kills and decommissions sent and not yet seen to finish: sent again after re-attaching. */
  private val pendingKills = ConcurrentHashMap.newKeySet[String]()
  private val pendingDecommissions = ConcurrentHashMap.newKeySet[String]()

  private val events = new StokerEventStream(blocking, target, appId, settings, attachment,
    driver, isStopped, () => reRegister(), id => {
      pendingKills.remove(id)
      pendingDecommissions.remove(id)
    })
  private val requests = new StokerRequests(channel, target, settings, attachment, isStopped,
    events.reconnect)
  private val heartbeats: ScheduledExecutorService =
    ThreadUtils.newDaemonSingleThreadScheduledExecutor("stoker-heartbeat")

  // ---- accessors (logging and tests) -------------------------------------------------------
  def currentToken: String = attachment.currentToken
  def currentIncarnation: Option[String] = attachment.currentIncarnation
  def lastHandledSeq: Long = attachment.lastHandledSeq
  def isAttached: Boolean = attachment.isAttached
  def desiredTotalsSnapshot: Map[Int, Int] = desiredTotals.asScala.toMap
  def maxExecutorId: Long = attachment.maxExecutorId
  def liveExecutorIds: Seq[String] = attachment.liveExecutorIds

  /**
   * Executors of `profile` that stoker started and reported, that have neither exited nor been
   * asked to go, and that are not in `registered` (the driver's): they hold no task and no block.
   */
  def startingExecutorsOf(profile: Int, registered: Set[String]): Seq[String] =
    attachment.liveExecutorsOf(profile).filterNot { id =>
      registered.contains(id) || pendingKills.contains(id) || pendingDecommissions.contains(id)
    }

  // ---- lifecycle ---------------------------------------------------------------------------

  /**
   * Registers the application, retrying while stoker is unreachable for up to
   * spark.stoker.registration.timeout, then starts the event stream and the heartbeat.
   * Throws a SparkException that says what went wrong when registration fails.
   */
  def start(initialTargets: Map[Int, Int]): Unit = {
    initialTargets.foreach { case (p, n) => desiredTotals.put(p, n) }
    registerAtStart()
    events.start()
    scheduleHeartbeat(heartbeatIntervalMs)
  }

  private def registerAtStart(): Unit = {
    val timeoutMs = settings.registrationTimeoutMs
    val deadline = System.nanoTime() + TimeUnit.MILLISECONDS.toNanos(timeoutMs)
    val backoff = new StokerBackoff(settings.initialBackoffMs, settings.maxBackoffMs, isStopped)
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
      if (leftMs <= backoff.stepMs) {
        throw new SparkException(s"Could not register application $appId with stoker at " +
          s"$target within $timeoutMs ms ($attempt attempts; last error: " +
          s"${describe(lastError)}). Check that stoker is running and reachable from the " +
          s"driver at the master URL's host:port (${StokerSettings.RegistrationTimeout} sets " +
          "how long to wait).", lastError)
      }
      backoff.pause()
      channel.resetConnectBackoff()
    }
  }

  /** Stops the threads; pending requests complete with false. Idempotent. */
  def stop(): Unit = {
    if (!stopped.compareAndSet(false, true)) return
    attachment.wakeAll()
    events.cancel()
    heartbeats.shutdownNow()
    requests.stop()
    events.stop()
  }

  /**
   * Best effort, after [[stop]]: sets every profile's target to 0 so that executors leaving
   * during Spark's own shutdown are not replaced.
   */
  def releaseTargets(): Unit = {
    if (!attachment.wasEverRegistered) return
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
  def unregister(usage: Seq[ProfileUsage] = Nil): Unit = {
    if (!attachment.wasEverRegistered) return
    try {
      val resp = stub(settings.unregisterTimeoutMs).unregisterApplication(
        UnregisterApplicationRequest.newBuilder().setAppId(appId).setToken(currentToken)
          .addAllUsage(usage.asJava).build())
      logInfo(s"Unregistered application $appId from stoker at $target " +
        s"(${resp.getRemovedExecutors} executor(s) being removed)")
      resp.getNotesList.asScala.foreach(note => logWarning(s"stoker: $note"))
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
      requests.enqueue("RegisterApplication (template update: new resource profile)") {
        val resp = stub().registerApplication(registrationRequest())
        applyRegistration(resp, Registration.TemplateUpdate)
      }
    } else {
      val targets = totals.toSeq.sortBy(_._1).map { case (p, n) => profileTarget(p, n) }
      requests.enqueue(s"RequestTotalExecutors(${formatTotals(totals)})") {
        stub().requestTotalExecutors(RequestTotalExecutorsRequest.newBuilder()
          .setAppId(appId).setToken(currentToken).addAllTargets(targets.asJava).build())
      }
    }
  }

  /** Kills executors; adjust_target = false because Spark lowers its totals itself. */
  def kill(executorIds: Seq[String]): Future[Boolean] = {
    executorIds.filterNot(attachment.hasExited).foreach(pendingKills.add)
    sendKill(executorIds, "")
  }

  /** Decommissions executors; adjust_target = false because Spark adjusts its totals itself. */
  def decommission(executorIds: Seq[String]): Future[Boolean] = {
    executorIds.filterNot(attachment.hasExited).foreach(pendingDecommissions.add)
    sendDecommission(executorIds, "")
  }

  private def sendKill(ids: Seq[String], note: String): Future[Boolean] =
    requests.enqueue(s"KillExecutors(${ids.mkString(", ")})$note") {
      val resp = stub().killExecutors(KillExecutorsRequest.newBuilder()
        .setAppId(appId).setToken(currentToken).addAllExecutorIds(ids.asJava)
        .setAdjustTarget(false).build())
      logDebug(s"stoker: killing ${resp.getKilledList.asScala.mkString(", ")}")
    }

  private def sendDecommission(ids: Seq[String], note: String): Future[Boolean] =
    requests.enqueue(s"DecommissionExecutors(${ids.mkString(", ")})$note") {
      val resp = stub().decommissionExecutors(DecommissionExecutorsRequest.newBuilder()
        .setAppId(appId).setToken(currentToken).addAllExecutorIds(ids.asJava)
        .setAdjustTarget(false).build())
      logDebug(s"stoker: decommissioning ${resp.getDecommissioningList.asScala.mkString(", ")}")
    }

  // ---- registration ------------------------------------------------------------------------

  private def registrationRequest(): RegisterApplicationRequest = {
    // Ask the driver outside every lock of ours: it takes the backend's lock.
    val driverIds = try driver.driverExecutorIds() catch {
      case NonFatal(e) =>
        logWarning("stoker: could not list the driver's executors", e)
        Nil
    }
    val (tok, lastId, known) = attachment.registrationView(driverIds)
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
    val r = attachment.registered(resp, reattach = kind == Registration.Reattach)
    if (r.tokenReplaced) {
      logWarning("stoker: the application token changed on re-registration; using the new one")
    }
    val previous = r.previousIncarnation.orNull
    val inc = resp.getIncarnation
    kind match {
      case Registration.First =>
        logInfo(s"Registered application $appId with stoker at $target (incarnation $inc, " +
          s"lease TTL ${r.leaseTtlMs} ms)")
      case Registration.Reattach =>
        val how = if (r.incarnationChanged) {
          s"stoker restarted (incarnation $previous -> $inc): watching its events from the start"
        } else {
          s"incarnation $inc, resuming events after seq ${r.resumeAfter}"
        }
        logInfo(s"re-attached to stoker at $target (application $appId, " +
          s"${if (resp.getReattached) "known" else "registered anew"}; $how)")
      case Registration.TemplateUpdate =>
        logInfo(s"stoker: sent the executor template with a new resource profile " +
          s"(${template().getProfilesCount} profiles)")
        if (r.incarnationChanged) {
          logInfo(s"re-attached to stoker at $target (application $appId; stoker restarted: " +
            s"incarnation $previous -> $inc, watching its events from the start)")
          events.cancel() // the supervisor reopens the stream for the new epoch
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
    val kills = pendingKills.asScala.filterNot(attachment.hasExited).toSeq.sorted
    val decoms = pendingDecommissions.asScala.filterNot(attachment.hasExited).toSeq.sorted
    if (kills.nonEmpty) sendKill(kills, " (again, after re-attaching)")
    if (decoms.nonEmpty) sendDecommission(decoms, " (again, after re-attaching)")
  }

  // ---- heartbeat ---------------------------------------------------------------------------

  private def heartbeatIntervalMs: Long = {
    val ttl = attachment.leaseTtl
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
      val (attached, e, acked, tok, inc) = attachment.heartbeatView
      if (attached && !stopped.get) {
        val interval = heartbeatIntervalMs
        try {
          val resp = stub(math.min(settings.rpcTimeoutMs, math.max(interval, 1000L)))
            .heartbeat(HeartbeatRequest.newBuilder()
              .setAppId(appId).setToken(tok).setAckedSeq(acked).build())
          if (resp.getIncarnation.nonEmpty && resp.getIncarnation != inc) {
            events.reconnect(e,
              s"stoker restarted (incarnation $inc -> ${resp.getIncarnation})")
          } else {
            attachment.renewTtl(e, resp.getLeaseTtlMs)
          }
        } catch {
          case ex: StatusRuntimeException =>
            if (!stopped.get) events.reconnect(e, s"heartbeat failed: ${describe(ex)}")
        }
      }
    } catch {
      case NonFatal(t) => logWarning("stoker: heartbeat error", t)
    } finally {
      scheduleHeartbeat(heartbeatIntervalMs)
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
