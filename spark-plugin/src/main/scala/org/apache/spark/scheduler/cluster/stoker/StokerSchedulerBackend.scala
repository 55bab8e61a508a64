/*
 * stoker: a cluster manager that gives Spark executors.
 */
package org.apache.spark.scheduler.cluster.stoker

import java.security.SecureRandom
import java.util.concurrent.{ConcurrentHashMap, TimeUnit}
import java.util.concurrent.atomic.{AtomicBoolean, AtomicLong}

import scala.concurrent.Future
import scala.jdk.CollectionConverters._
import scala.util.control.NonFatal

import dev.stoker.proto.v1.{ExecutorTemplate, ResourceProfile => ProtoProfile, SparkPods, SparkProfilePod}
import io.grpc.ManagedChannel

import org.apache.spark.SparkContext
import org.apache.spark.deploy.security.HadoopDelegationTokenManager
import org.apache.spark.internal.config.{DECOMMISSION_ENABLED, SCHEDULER_MIN_REGISTERED_RESOURCES_RATIO}
import org.apache.spark.resource.ResourceProfile
import org.apache.spark.rpc.RpcAddress
import org.apache.spark.scheduler.{ExecutorDecommission, ExecutorDecommissionInfo, ExecutorLossReason, TaskSchedulerImpl}
import org.apache.spark.scheduler.cluster.{CoarseGrainedSchedulerBackend, SchedulerBackendUtils}
import org.apache.spark.util.{ThreadUtils, Utils}

/**
 * A CoarseGrainedSchedulerBackend whose executors come from stoker. Executors are started by
 * stoker and register with the driver through Spark's own RPC, as on Kubernetes; this class
 * tells stoker how many executors to run and which to remove, and reports every executor stoker
 * saw exit to Spark exactly once, with a structured reason.
 *
 * Built and tested against Spark 4.2.0: it relies on private[spark] APIs.
 */
private[spark] class StokerSchedulerBackend(
    scheduler: TaskSchedulerImpl,
    sc: SparkContext,
    master: StokerMaster)
  extends CoarseGrainedSchedulerBackend(scheduler, sc.env.rpcEnv) {

  // As the Kubernetes backend: wait for 80% of the initial executors unless told otherwise.
  protected override val minRegisteredRatio: Double =
    if (conf.get(SCHEDULER_MIN_REGISTERED_RESOURCES_RATIO).isEmpty) {
      0.8
    } else {
      super.minRegisteredRatio
    }

  private val initialExecutors = SchedulerBackendUtils.getInitialTargetExecutorNumber(conf)
  private val minRegisteredExecutors = initialExecutors * minRegisteredRatio

  private val settings = StokerSettings.fromConf(conf)
  StokerAuth.checkTransport(conf, master, settings.auth)
  private val appId = {
    val configured = conf.getOption("spark.app.id")
    val id = StokerSchedulerBackend.chooseAppId(configured)
    configured.filter(_.trim != id).foreach { c =>
      logWarning(s"spark.app.id '$c' is not a valid stoker application id (at most 63 " +
        s"characters of [A-Za-z0-9._-], alphanumeric at both ends): using $id")
    }
    id
  }
  private val profiles = new ConcurrentHashMap[Int, ProtoProfile]()
  /** Spark's profiles by id, for the Spark-built pods. */
  private val resourceProfiles = new ConcurrentHashMap[Int, ResourceProfile]()
  /** Each profile's Spark-built pod, built once, off the scheduler's locks (see currentTemplate). */
  private val profilePods = new ConcurrentHashMap[Int, SparkProfilePod]()
  /** The application-level part of the Spark-built pods; null without Spark's Kubernetes classes. */
  @volatile private var sparkPods: SparkPods = null
  private val stopping = new AtomicBoolean(false)
  /** Gives executors back when stoker reclaims them, off the event stream's thread. */
  private val reclaimer = ThreadUtils.newDaemonSingleThreadScheduledExecutor("stoker-reclaim")
  /** The latest reclaim request: an older one's retries stop. */
  private val reclaimGeneration = new AtomicLong(0L)

  @volatile private var baseTemplate: ExecutorTemplate = null
  @volatile private var channel: ManagedChannel = null
  @volatile private var session: StokerSession = null

  /** A stable id chosen before start(): SparkContext sets spark.app.id from it afterwards. */
  override def applicationId(): String = appId

  override def start(): Unit = {
    super.start()
    val defaultProfile = sc.resourceProfileManager.defaultResourceProfile
    profiles.put(defaultProfile.id, StokerTemplate.profile(defaultProfile, conf))
    resourceProfiles.put(defaultProfile.id, defaultProfile)
    sparkPods = buildSparkPods()
    baseTemplate = StokerTemplate.build(
      conf = conf,
      appId = appId,
      sparkUser = sc.sparkUser,
      executorEnvs = sc.executorEnvs.toMap,
      authSecret = StokerTemplate.authSecret(conf, sc.env.securityManager),
      profiles = Nil,
      readFile = StokerTemplate.readPodTemplate(_, conf))

    channel = StokerTls.channelBuilder(master, settings.tls)
      .keepAliveTime(30, TimeUnit.SECONDS)
      .keepAliveTimeout(10, TimeUnit.SECONDS)
      .maxInboundMessageSize(64 << 20)
      .userAgent(s"stoker-spark-plugin/${org.apache.spark.SPARK_VERSION}")
      .build()

    val hooks = new StokerDriver {
      override def driverExecutorIds(): Seq[String] = getExecutorIds()
      override def removeExecutor(executorId: String, reason: ExecutorLossReason): Unit =
        StokerSchedulerBackend.this.removeExecutor(executorId, reason)
      override def applicationFailed(message: String): Unit = dead(message)
      override def reclaim(request: StokerReclaim.Request): Unit =
        StokerSchedulerBackend.this.reclaim(request)
    }
    val (queue, minExecutors) = StokerTemplate.admission(conf)
    session = new StokerSession(channel, master.hostPort, appId, sc.appName,
      StokerSession.newToken(), () => currentTemplate(), StokerTemplate.failurePolicy(conf),
      hooks, settings, queue, minExecutors)
    logInfo(s"Registering application $appId with stoker at ${master.hostPort} " +
      s"($initialExecutors initial executor(s))")
    try {
      session.start(Map(defaultProfile.id -> initialExecutors))
    } catch {
      case e: Throwable =>
        Utils.tryLogNonFatalError(session.stop())
        closeChannel()
        throw e
    }
  }

  /**
   * With Spark's Kubernetes classes on the class path: the application-level part of the
   * executor pods Spark's own builder makes (each profile's pod is added by currentTemplate),
   * after a warning for each key stoker does not honour. Without them: null, and stoker builds
   * pods from the template's fields as before.
   */
  private def buildSparkPods(): SparkPods = {
    if (!StokerSparkPods.available()) {
      logInfo("stoker: Spark's Kubernetes classes are not on the class path; the Kubernetes " +
        "backend builds executor pods from the template's spark.kubernetes.* settings")
      return null
    }
    val pods = StokerSparkPods.appLevel(conf, appId).build()
    val strict = pods.getStrict
    pods.getUnsupportedKeysMap.asScala.toSeq.sorted.foreach { case (key, reason) =>
      logWarning(s"stoker: $key is not honoured: $reason" +
        (if (strict) s" (${StokerSparkPods.StrictConfKey}=true: stoker refuses the application)"
         else s" (set ${StokerSparkPods.StrictConfKey}=true to be refused instead)"))
    }
    logInfo("stoker: executor pods are built by Spark's KubernetesExecutorBuilder")
    pods
  }

  /** The base template with one entry per resource profile known so far. */
  private def currentTemplate(): ExecutorTemplate = {
    val ps = profiles.values().asScala.toSeq.sortBy(_.getId)
    val b = baseTemplate.toBuilder.clearProfiles().addAllProfiles(ps.asJava)
    val base = sparkPods
    if (base != null) {
      val pods = ps.flatMap(p => Option(resourceProfiles.get(p.getId))).map { rp =>
        profilePods.computeIfAbsent(rp.id, _ => {
          val pod = StokerSparkPods.profilePod(conf, appId, rp, sc.env.securityManager)
          if (!pod.getError.isEmpty) {
            logError(s"stoker: Spark cannot build the executor pod of resource profile " +
              s"${rp.id}: ${pod.getError}")
          }
          pod
        })
      }
      b.setSparkPods(base.toBuilder.clearProfiles().addAllProfiles(pods.asJava))
    }
    b.build()
  }

  override def stop(): Unit = {
    if (!stopping.compareAndSet(false, true)) return
    reclaimer.shutdownNow()
    val s = session
    if (s != null) {
      Utils.tryLogNonFatalError(s.stop())
      // No replacements while Spark stops its executors (super.stop() asks them to exit).
      Utils.tryLogNonFatalError(s.releaseTargets())
    }
    Utils.tryLogNonFatalError(super.stop())
    // The run's peak memory per profile, for stoker's sizes across runs.
    if (s != null) Utils.tryLogNonFatalError(s.unregister(StokerUsage.report(sc)))
    closeChannel()
  }

  private def closeChannel(): Unit = {
    val ch = channel
    if (ch != null) {
      Utils.tryLogNonFatalError {
        ch.shutdown()
        if (!ch.awaitTermination(2, TimeUnit.SECONDS)) ch.shutdownNow()
      }
    }
  }

  /** As StandaloneSchedulerBackend.dead: fail the jobs and stop the SparkContext. */
  private def dead(reason: String): Unit = {
    if (!stopping.get) {
      logError(s"Application has been killed. Reason: $reason")
      try {
        scheduler.error(reason)
      } catch {
        case NonFatal(e) => logDebug(s"scheduler.error: $e")
      } finally {
        // Ensure the application terminates, as we can no longer run jobs.
        sc.stopInNewThread()
      }
    }
  }

  /**
   * Never blocks (Spark calls it under its scheduler locks): records the totals and queues the
   * request; a resource profile seen for the first time extends the template first.
   */
  override def doRequestTotalExecutors(
      resourceProfileToTotalExecs: Map[ResourceProfile, Int]): Future[Boolean] = {
    val s = session
    if (s == null) return Future.successful(false)
    var newProfile = false
    resourceProfileToTotalExecs.keys.foreach { rp =>
      if (!profiles.containsKey(rp.id)) {
        try {
          resourceProfiles.putIfAbsent(rp.id, rp)
          if (profiles.putIfAbsent(rp.id, StokerTemplate.profile(rp, conf)) == null) {
            logInfo(s"stoker: adding resource profile ${rp.id} to the executor template")
            newProfile = true
          }
        } catch {
          case NonFatal(e) => logError(s"stoker: cannot describe resource profile ${rp.id}", e)
        }
      }
    }
    s.requestTotals(resourceProfileToTotalExecs.map { case (rp, n) => rp.id -> n }, newProfile)
  }

  /** Never blocks; Spark has already lowered its totals, so stoker does not adjust them. */
  override def doKillExecutors(executorIds: Seq[String]): Future[Boolean] = {
    val s = session
    if (s == null || executorIds.isEmpty) Future.successful(executorIds.isEmpty)
    else s.kill(executorIds)
  }

  override def decommissionExecutors(
      executorsAndDecomInfo: Array[(String, ExecutorDecommissionInfo)],
      adjustTargetNumExecutors: Boolean,
      triggeredByExecutor: Boolean): Seq[String] = {
    val decommissioned =
      super.decommissionExecutors(executorsAndDecomInfo, adjustTargetNumExecutors,
        triggeredByExecutor)
    val s = session
    // Spark adjusted its totals itself when asked to; stoker only marks the executors so that it
    // reports them as DECOMMISSIONED and removes them after the grace period.
    if (s != null && decommissioned.nonEmpty) s.decommission(decommissioned)
    decommissioned
  }

  /**
   * stoker asks for executors back (fair share). [[StokerReclaim.choose]] takes executors stoker
   * started that have not registered with the driver yet first (stopped through stoker: they hold
   * nothing), then, among the executors of the profile that Spark still uses (not being removed
   * or decommissioned), idle ones, then those with the fewest running tasks and the least shuffle
   * and cached data; those are decommissioned through Spark: no new task goes to them, running
   * ones finish, and with spark.storage.decommission.* their blocks migrate before they exit.
   * Spark's totals are not lowered (adjustTargetNumExecutors = false), as dynamic allocation does
   * when it decommissions: stoker creates no more than the fair share admits whatever total is
   * asked, so nothing is asked again, and the total stays what the application needs for when
   * its share grows.
   *
   * Without spark.decommission.enabled an executor ignores the decommission message: the idle
   * ones chosen are killed instead (Spark refuses to kill a busy one: force = false), and
   * stoker removes what is still over the share at its deadline.
   */
  private def reclaim(request: StokerReclaim.Request): Unit = {
    val generation = reclaimGeneration.incrementAndGet()
    val deadlineMs = System.currentTimeMillis() + request.timeoutMs
    try {
      reclaimer.execute(() => giveBack(request, request.count, generation, deadlineMs))
    } catch {
      case _: java.util.concurrent.RejectedExecutionException => // stopping
    }
  }

  /**
   * Gives back up to `left` executors now; executors stoker has not reported yet (its events
   * may trail the request) cannot be chosen, so what is missing is tried again every second until
   * a second before the deadline (then stoker removes the newest itself), unless a newer request
   * came.
   */
  private def giveBack(request: StokerReclaim.Request, left: Int, generation: Long,
      deadlineMs: Long): Unit = {
    if (stopping.get || reclaimGeneration.get != generation) return
    val given = try decommissionForReclaim(request, left) catch {
      case NonFatal(e) =>
        logWarning("stoker: could not give executors back", e)
        0
    }
    val rest = left - given
    if (rest > 0 && System.currentTimeMillis() + 2000 < deadlineMs) {
      try {
        reclaimer.schedule(new Runnable {
          override def run(): Unit = giveBack(request, rest, generation, deadlineMs)
        }, 1, TimeUnit.SECONDS)
      } catch {
        case _: java.util.concurrent.RejectedExecutionException => // stopping
      }
    }
  }

  /**
   * Chooses up to `count` executors and gives them back; how many were given. Executors stoker
   * started that have not registered with the driver yet go first and are stopped through stoker
   * (they hold nothing); registered ones are decommissioned through Spark.
   */
  private def decommissionForReclaim(request: StokerReclaim.Request, count: Int): Int = {
    val s = session
    if (s == null) return 0
    val registered = getExecutorIds()
    val candidates = registered.filter { id =>
      isExecutorActive(id) && getExecutorResourceProfileId(id) == request.profileId
    }
    val running = scheduler.runningTasksByExecutors
    val stored = try {
      sc.statusStore.executorList(true)
        .map(e => e.id -> (e.totalShuffleWrite, e.memoryUsed + e.diskUsed)).toMap
    } catch {
      case NonFatal(e) =>
        logDebug(s"stoker: no executor summaries for the reclaim choice: $e")
        Map.empty[String, (Long, Long)]
    }
    val loads = candidates.map { id =>
      val (shuffle, cached) = stored.getOrElse(id, (0L, 0L))
      StokerReclaim.Load(id, running.getOrElse(id, 0), shuffle, cached)
    } ++ s.startingExecutorsOf(request.profileId, registered.toSet)
      .map(StokerReclaim.starting)
    val chosen = StokerReclaim.choose(loads, count)
    if (chosen.isEmpty) {
      logDebug(s"stoker: no executor of resource profile ${request.profileId} to give back " +
        "yet (none reported, or all being removed already)")
      return 0
    }
    val byId = loads.map(l => l.id -> l).toMap
    val (toStop, toDecommission) = chosen.partition(id => !byId(id).registered)
    if (toStop.nonEmpty) {
      logWarning(s"stoker: giving back executor(s) ${toStop.map(byId(_).describe).mkString(", ")} " +
        s"by stopping them before they start work (${request.reason})")
      s.kill(toStop)
    }
    if (toDecommission.isEmpty) return chosen.size
    val described = toDecommission.map(byId(_).describe).mkString(", ")
    if (conf.get(DECOMMISSION_ENABLED)) {
      // A warning, as stoker's request: the driver's log shows what was given back and why.
      logWarning(s"stoker: giving back executor(s) $described by decommissioning them " +
        s"(${request.reason})")
      val info = ExecutorDecommissionInfo(s"stoker reclaim: ${request.reason}")
      decommissionExecutors(toDecommission.map(_ -> info).toArray,
        adjustTargetNumExecutors = false, triggeredByExecutor = false)
    } else {
      logWarning(s"stoker: ${DECOMMISSION_ENABLED.key} is false, so executors cannot be " +
        s"decommissioned: killing the idle ones of $described (busy ones are left to stoker's " +
        "deadline); set it to true to let running tasks finish and blocks migrate")
      killExecutors(toDecommission, adjustTargetNumExecutors = false, countFailures = false,
        force = false)
    }
    chosen.size
  }

  override def sufficientResourcesRegistered(): Boolean =
    totalRegisteredExecutors.get() >= minRegisteredExecutors

  override def createDriverEndpoint(): DriverEndpoint = new StokerDriverEndpoint()

  /**
   * As Spark's Kubernetes (and YARN) backend: with Hadoop security on, the driver obtains Hadoop
   * delegation tokens (renewing them with a keytab when one is configured) and sends them to its
   * executors. Spark calls this only when UserGroupInformation.isSecurityEnabled.
   */
  override protected def createTokenManager(): Option[HadoopDelegationTokenManager] =
    Some(new HadoopDelegationTokenManager(conf, sc.hadoopConfiguration, driverEndpoint))

  /**
   * As on Kubernetes: a disconnected executor is only disabled; stoker's EXITED event then
   * removes it with the real reason (OOM kill, eviction, ...) instead of a generic
   * "disassociated". Decommissioning executors are removed at once.
   */
  private class StokerDriverEndpoint extends DriverEndpoint {
    override def onDisconnected(rpcAddress: RpcAddress): Unit = {
      addressToExecutorId.get(rpcAddress).foreach { id =>
        if (executorsPendingDecommission.contains(id)) {
          removeExecutor(id, ExecutorDecommission(None))
        } else {
          disableExecutor(id)
        }
      }
    }
  }
}

private[spark] object StokerSchedulerBackend {
  /**
   * The protocol accepts 1..253 characters of [A-Za-z0-9._-]; stoker's Kubernetes backend also
   * puts the id in a label value (at most 63 characters, alphanumeric at both ends, like Spark's
   * spark-app-selector label), so the plugin keeps to that subset.
   */
  private val ValidAppId = "^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$".r

  def isValidAppId(id: String): Boolean = ValidAppId.matches(id)

  /** "stoker-<epoch millis>-<8 random hex digits>" (29 characters). */
  def generateAppId(): String = {
    val bytes = new Array[Byte](4)
    new SecureRandom().nextBytes(bytes)
    s"stoker-${System.currentTimeMillis()}-${bytes.map(b => f"${b & 0xff}%02x").mkString}"
  }

  /** The user's spark.app.id when it is a valid stoker id, else a generated one. */
  def chooseAppId(configured: Option[String]): String =
    configured.map(_.trim).filter(isValidAppId).getOrElse(generateAppId())
}
