/*
 * stoker: a cluster manager that gives Spark executors.
 */
package org.apache.spark.scheduler.cluster.stoker

import java.net.{InetAddress, InetSocketAddress, URI, URLDecoder, URLEncoder, UnknownHostException}
import java.nio.charset.StandardCharsets
import java.util.concurrent.Executor

import scala.jdk.CollectionConverters._
import scala.util.control.NonFatal

import io.grpc.{Attributes, EquivalentAddressGroup, NameResolver, NameResolverProvider, NameResolverRegistry, Status}

/**
 * A gRPC name resolver for several stoker addresses (the replicas of one stoker with leader
 * election). It hands gRPC every address, in the order the master URL lists them, each resolved
 * by DNS; gRPC's default `pick_first` policy connects to the first that accepts. Standby replicas
 * do not listen, so that is the leader; when the leader dies the channel reconnects, asks this
 * resolver again, and finds the new one.
 *
 * gRPC is shaded into the plugin's jar, so registering the provider in the (relocated) default
 * registry touches no other gRPC user in the driver.
 */
private[spark] object StokerEndpointsResolver {
  val Scheme = "stoker-endpoints"

  /** The target naming these endpoints (URL-encoded, so IPv6 brackets are safe in the path). */
  def target(endpoints: Seq[StokerEndpoint]): String = {
    register()
    val list = endpoints.map(_.hostPort).mkString(",")
    s"$Scheme:///${URLEncoder.encode(list, StandardCharsets.UTF_8)}"
  }

  /** The endpoints a target names (the inverse of [[target]]). */
  def endpointsOf(uri: URI): Seq[StokerEndpoint] = {
    val list = URLDecoder.decode(uri.getRawPath.stripPrefix("/"), StandardCharsets.UTF_8)
    StokerMaster.parse(s"stoker://$list").endpoints
  }

  private lazy val registered: Unit = NameResolverRegistry.getDefaultRegistry.register(new Provider)

  private def register(): Unit = registered

  private class Provider extends NameResolverProvider {
    override def getDefaultScheme: String = Scheme
    override protected def isAvailable: Boolean = true
    override protected def priority(): Int = 5
    override def newNameResolver(targetUri: URI, args: NameResolver.Args): NameResolver =
      if (targetUri.getScheme != Scheme) null
      else new Resolver(endpointsOf(targetUri), Option(args.getOffloadExecutor))
  }

  private class Resolver(endpoints: Seq[StokerEndpoint], offload: Option[Executor])
      extends NameResolver {
    @volatile private var listener: NameResolver.Listener2 = _

    override def getServiceAuthority: String = endpoints.head.hostPort

    override def start(l: NameResolver.Listener2): Unit = {
      listener = l
      resolve()
    }

    override def refresh(): Unit = resolve()

    override def shutdown(): Unit = ()

    /** DNS lookups can block: run them off gRPC's synchronization context when it offers one. */
    private def resolve(): Unit = offload match {
      case Some(executor) => executor.execute(() => publish())
      case None => publish()
    }

    private def publish(): Unit = {
      val l = listener
      if (l == null) return
      val groups = endpoints.flatMap { e =>
        try {
          val addresses = InetAddress.getAllByName(e.host).toSeq
            .map(a => new InetSocketAddress(a, e.port): java.net.SocketAddress)
          // Each replica's own name as the authority: with TLS, its certificate is checked
          // against the host the master URL names for it, not the first one's.
          val attrs = Attributes.newBuilder()
            .set(EquivalentAddressGroup.ATTR_AUTHORITY_OVERRIDE, e.hostPort).build()
          Some(new EquivalentAddressGroup(addresses.asJava, attrs))
        } catch {
          case _: UnknownHostException => None
          case NonFatal(_) => None
        }
      }
      if (groups.isEmpty) {
        l.onError(Status.UNAVAILABLE.withDescription(
          s"none of the stoker addresses resolves: ${endpoints.map(_.hostPort).mkString(",")}"))
      } else {
        l.onResult(NameResolver.ResolutionResult.newBuilder().setAddresses(groups.asJava).build())
      }
    }
  }
}
