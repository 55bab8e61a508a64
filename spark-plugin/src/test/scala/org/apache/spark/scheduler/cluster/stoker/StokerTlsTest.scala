package org.apache.spark.scheduler.cluster.stoker

import java.io.File
import java.net.InetSocketAddress
import java.nio.charset.StandardCharsets
import java.nio.file.{Files, Path, Paths, StandardCopyOption}
import java.security.KeyStore
import java.util.Base64
import java.util.concurrent.TimeUnit

import scala.util.Try

import dev.stoker.proto.v1.{ExecutorAllocatorGrpc, RegisterApplicationRequest}
import io.grpc.{ManagedChannel, Server, StatusRuntimeException}
import io.grpc.netty.shaded.io.grpc.netty.{GrpcSslContexts, NettyServerBuilder}
import io.grpc.netty.shaded.io.netty.handler.ssl.ClientAuth
import org.junit.jupiter.api.{AfterEach, Test}

import org.apache.spark.{SparkConf, SparkException}

/**
 * The driver's channel over TLS, against grpc-java's Netty server with certificates made here by
 * the JDK's keytool: it reaches the server with the CA and fails without it, presents its client
 * certificate, follows rotated files at its next connection, and refuses bad settings by key.
 */
class StokerTlsTest extends Checks {
  private val dir = Files.createTempDirectory("stoker-tls-test")
  private var servers: List[Server] = Nil
  private var channels: List[ManagedChannel] = Nil

  @AfterEach def cleanUp(): Unit = {
    channels.foreach(_.shutdownNow())
    servers.foreach(_.shutdownNow())
    channels.foreach(_.awaitTermination(5, TimeUnit.SECONDS))
    servers.foreach(_.awaitTermination(5, TimeUnit.SECONDS))
    Files.walk(dir).sorted(java.util.Comparator.reverseOrder()).forEach(p => Files.delete(p))
  }

  /** A self-signed EC certificate for 127.0.0.1 and localhost: its PEM and its key's PKCS#8 PEM. */
  private case class Identity(name: String, cert: String, key: String)

  private def selfSigned(name: String): Identity = {
    val store = dir.resolve(s"$name.p12")
    val keytool = Paths.get(System.getProperty("java.home"), "bin", "keytool").toString
    val process = new ProcessBuilder(keytool, "-genkeypair", "-alias", name, "-keyalg", "EC",
      "-groupname", "secp256r1", "-dname", s"CN=$name", "-ext", "san=ip:127.0.0.1,dns:localhost",
      "-validity", "2", "-keystore", store.toString, "-storetype", "PKCS12",
      "-storepass", "changeit", "-keypass", "changeit")
      .redirectErrorStream(true).start()
    val output = new String(process.getInputStream.readAllBytes(), StandardCharsets.UTF_8)
    check(process.waitFor(60, TimeUnit.SECONDS) && process.exitValue() == 0, s"keytool: $output")
    val keys = KeyStore.getInstance("PKCS12")
    val in = Files.newInputStream(store)
    try keys.load(in, "changeit".toCharArray) finally in.close()
    def pem(kind: String, der: Array[Byte]): String =
      s"-----BEGIN $kind-----\n" + Base64.getMimeEncoder(64, "\n".getBytes).encodeToString(der) +
        s"\n-----END $kind-----\n"
    Identity(name,
      pem("CERTIFICATE", keys.getCertificate(name).getEncoded),
      pem("PRIVATE KEY", keys.getKey(name, "changeit".toCharArray).getEncoded))
  }

  /** Writes `content` to `name` as a secret volume does: aside, then renamed over. */
  private def install(name: String, content: String): String = {
    val target = dir.resolve(name)
    val aside = dir.resolve(s".$name.new")
    Files.write(aside, content.getBytes(StandardCharsets.US_ASCII))
    Files.move(aside, target, StandardCopyOption.REPLACE_EXISTING, StandardCopyOption.ATOMIC_MOVE)
    target.toString
  }

  private def file(id: Identity, what: String): File = {
    val path = dir.resolve(s"${id.name}-server.$what")
    Files.write(path, (if (what == "crt") id.cert else id.key).getBytes(StandardCharsets.US_ASCII))
    path.toFile
  }

  /** A TLS server with `id`'s certificate; with `clientTrust`, client certificates are required. */
  private def server(id: Identity, clientTrust: Option[Identity] = None, port: Int = 0): Server = {
    val ssl = GrpcSslContexts.forServer(file(id, "crt"), file(id, "key"))
    clientTrust.foreach { c =>
      ssl.trustManager(file(c, "crt")).clientAuth(ClientAuth.REQUIRE)
    }
    val s = NettyServerBuilder.forAddress(new InetSocketAddress("127.0.0.1", port))
      .sslContext(ssl.build())
      .addService(new FakeStoker("tls"))
      .build()
      .start()
    servers ::= s
    s
  }

  private def channel(master: StokerMaster, tls: Option[StokerTls]): ManagedChannel = {
    val ch = StokerTls.channelBuilder(master, tls).build()
    channels ::= ch
    ch
  }

  private def register(ch: ManagedChannel): Try[Unit] = Try {
    ExecutorAllocatorGrpc.newBlockingStub(ch).withDeadlineAfter(5, TimeUnit.SECONDS)
      .registerApplication(RegisterApplicationRequest.newBuilder().setAppId("app-tls").build())
    ()
  }

  private def refused(result: Try[Unit]): Boolean =
    result.failed.toOption.exists(_.isInstanceOf[StatusRuntimeException])

  @Test def aChannelWithTheCaReachesATlsServerAndFailsWithoutIt(): Unit = {
    val id = selfSigned("stoker-a")
    val s = server(id)
    val master = StokerMaster("127.0.0.1", s.getPort)
    val ca = install("ca.pem", id.cert)

    register(channel(master, Some(StokerTls(Some(ca), None, None)))).get
    check(refused(register(channel(master, Some(StokerTls(None, None, None))))),
      "the JVM's trust store does not know the test certificate")
    check(refused(register(channel(master, None))), "a plaintext channel gets no answer")
  }

  @Test def aClientCertificateIsPresentedWhenTheServerAsksForOne(): Unit = {
    val id = selfSigned("stoker-b")
    val driver = selfSigned("driver-b")
    val s = server(id, clientTrust = Some(driver))
    val master = StokerMaster("127.0.0.1", s.getPort)
    val ca = install("ca.pem", id.cert)
    val cert = install("client.crt", driver.cert)
    val key = install("client.key", driver.key)

    register(channel(master, Some(StokerTls(Some(ca), Some(cert), Some(key))))).get
    check(refused(register(channel(master, Some(StokerTls(Some(ca), None, None))))),
      "a channel without a client certificate is refused")
  }

  @Test def rotatedFilesAreUsedFromTheNextConnection(): Unit = {
    val (first, second) = (selfSigned("stoker-c1"), selfSigned("stoker-c2"))
    val (driver1, driver2) = (selfSigned("driver-c1"), selfSigned("driver-c2"))
    val one = server(first, clientTrust = Some(driver1))
    val tls = StokerTls(Some(install("ca.pem", first.cert)), Some(install("client.crt", driver1.cert)),
      Some(install("client.key", driver1.key)))
    // The second replica, as after a failover: it trusts only the rotated client certificate.
    val two = server(second, clientTrust = Some(driver2))
    val master = StokerMaster(Seq(StokerEndpoint("127.0.0.1", one.getPort),
      StokerEndpoint("127.0.0.1", two.getPort)))
    val ch = channel(master, Some(tls))
    register(ch).get

    install("ca.pem", second.cert)
    install("client.key", driver2.key)
    install("client.crt", driver2.cert)
    one.shutdownNow().awaitTermination(5, TimeUnit.SECONDS)
    // The same channel reconnects, to the second replica, with the rotated CA and certificate.
    eventually("a call on the rotated files succeeds") { register(ch).isSuccess }
  }

  /** PEM of `der` as `kind`. */
  private def pemOf(kind: String, der: Array[Byte]): Array[Byte] =
    (s"-----BEGIN $kind-----\n" + Base64.getMimeEncoder(64, "\n".getBytes).encodeToString(der) +
      s"\n-----END $kind-----\n").getBytes(StandardCharsets.US_ASCII)

  /** A DER element with a short-or-long length. */
  private def tlv(tag: Int, content: Array[Byte]): Array[Byte] = {
    val n = content.length
    val length =
      if (n < 0x80) Array(n.toByte)
      else { val b = BigInt(n).toByteArray.dropWhile(_ == 0); Array((0x80 | b.length).toByte) ++ b }
    Array(tag.toByte) ++ length ++ content
  }

  @Test def keysInTheEncodingsCertManagerWritesAreRead(): Unit = {
    // SEC1 `EC PRIVATE KEY` with its curve (cert-manager's default for ECDSA keys).
    val ec = java.security.KeyPairGenerator.getInstance("EC")
    ec.initialize(new java.security.spec.ECGenParameterSpec("secp256r1"))
    val ecKey = ec.generateKeyPair().getPrivate.asInstanceOf[java.security.interfaces.ECPrivateKey]
    val scalar = ecKey.getS.toByteArray.dropWhile(_ == 0).reverse.padTo(32, 0.toByte).reverse
    val p256 = Array[Byte](0x06, 0x08, 0x2a, 0x86.toByte, 0x48, 0xce.toByte, 0x3d, 0x03, 0x01, 0x07)
    val sec1 = tlv(0x30, Array[Byte](0x02, 0x01, 0x01) ++ tlv(0x04, scalar) ++ tlv(0xa0, p256))
    val readEc = StokerTls.parsePrivateKey(pemOf("EC PRIVATE KEY", sec1))
    eq(ecKey.getS, readEc.asInstanceOf[java.security.interfaces.ECPrivateKey].getS, "EC scalar")

    // PKCS#1 `RSA PRIVATE KEY` (cert-manager's default for RSA keys): the inner part of the
    // PKCS#8 encoding Java makes, after its fixed 26-byte header for a 2048-bit key.
    val rsa = java.security.KeyPairGenerator.getInstance("RSA")
    rsa.initialize(2048)
    val rsaKey = rsa.generateKeyPair().getPrivate
      .asInstanceOf[java.security.interfaces.RSAPrivateCrtKey]
    val pkcs1 = rsaKey.getEncoded.drop(26)
    eq(0x30, pkcs1(0) & 0xff, "PKCS#1 starts with a SEQUENCE")
    val readRsa = StokerTls.parsePrivateKey(pemOf("RSA PRIVATE KEY", pkcs1))
      .asInstanceOf[java.security.interfaces.RSAPrivateCrtKey]
    eq(rsaKey.getModulus, readRsa.getModulus, "RSA modulus")
    eq(rsaKey.getPrivateExponent, readRsa.getPrivateExponent, "RSA exponent")

    // PKCS#8 as is; an encrypted key is refused by key.
    eq(ecKey.getS, StokerTls.parsePrivateKey(pemOf("PRIVATE KEY", ecKey.getEncoded))
      .asInstanceOf[java.security.interfaces.ECPrivateKey].getS, "PKCS#8")
    val encrypted = intercept[SparkException](
      StokerTls.parsePrivateKey(pemOf("ENCRYPTED PRIVATE KEY", Array[Byte](0x30, 0x00))))
    check(encrypted.getMessage.contains(StokerTls.KeyFile), encrypted.getMessage)
  }

  @Test def aHandshakeKeepsTheIdentityItChoseAcrossAReload(): Unit = {
    val (one, two) = (selfSigned("driver-f1"), selfSigned("driver-f2"))
    val cert = install("client.crt", one.cert)
    val key = install("client.key", one.key)
    val manager = new StokerTls.ReloadingKeyManager(cert, key)
    val chosen = manager.chooseEngineClientAlias(Array("EC"), null, null)
    check(chosen != null, "an alias for an EC key")
    val firstChain = manager.getCertificateChain(chosen).toSeq
    // Rotated between choosing the alias and reading its key, as a handshake may see it, while
    // another connection's handshake already picks the new identity.
    install("client.key", two.key)
    install("client.crt", two.cert)
    val next = manager.chooseEngineClientAlias(Array("EC"), null, null)
    check(next != chosen, s"a new alias after the reload, got $next")
    eq(firstChain, manager.getCertificateChain(chosen).toSeq, "the chosen alias's chain")
    check(manager.getPrivateKey(chosen) != null, "the chosen alias's key")
    check(manager.getCertificateChain(next).head != firstChain.head, "the rotated certificate")
    eq(null, manager.chooseEngineClientAlias(Array("RSA"), null, null), "no RSA key")
  }

  @Test def badSettingsAreRefusedByKey(): Unit = {
    val id = selfSigned("stoker-d")
    val ca = install("ca.pem", id.cert)
    def refusal(settings: (String, String)*): String = {
      val conf = new SparkConf(false).setAll(settings)
      intercept[SparkException](StokerTls.fromConf(conf)).getMessage
    }
    check(refusal(StokerTls.Enabled -> "yes").contains(StokerTls.Enabled), "enabled")
    check(refusal(StokerTls.CaFile -> ca).contains(StokerTls.Enabled), "caFile without enabled")
    check(refusal(StokerTls.Enabled -> "true", StokerTls.CaFile -> dir.resolve("no").toString)
      .contains(StokerTls.CaFile), "missing caFile")
    check(refusal(StokerTls.Enabled -> "true", StokerTls.CertFile -> ca).contains(StokerTls.KeyFile),
      "certFile without keyFile")
    eq(None, StokerTls.fromConf(new SparkConf(false)))
    eq(Some(StokerTls(Some(ca), None, None)), StokerTls.fromConf(new SparkConf(false)
      .set(StokerTls.Enabled, "true").set(StokerTls.CaFile, ca)))

    val notPem = install("bad.pem", "not a certificate")
    val caError = intercept[SparkException](StokerTls(Some(notPem), None, None).sslContext())
    check(caError.getMessage.contains(StokerTls.CaFile), caError.getMessage)
    val other = selfSigned("stoker-e")
    val mismatch = intercept[SparkException](StokerTls(Some(ca), Some(ca),
      Some(install("other.key", other.key))).sslContext())
    check(mismatch.getMessage.contains(StokerTls.KeyFile), mismatch.getMessage)
  }
}
