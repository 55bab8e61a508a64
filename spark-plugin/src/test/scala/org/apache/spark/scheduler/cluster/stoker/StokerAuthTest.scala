package org.apache.spark.scheduler.cluster.stoker

import java.net.InetSocketAddress
import java.nio.file.{Files, Path}
import java.nio.file.attribute.FileTime
import java.util.concurrent.{ConcurrentLinkedQueue, TimeUnit}

import scala.jdk.CollectionConverters._

import dev.stoker.proto.v1.{ExecutorAllocatorGrpc, RegisterApplicationRequest}
import io.grpc.{Metadata, ServerCall, ServerCallHandler, ServerInterceptor, ServerInterceptors}
import io.grpc.netty.shaded.io.grpc.netty.{NettyChannelBuilder, NettyServerBuilder}
import org.junit.jupiter.api.Test

import org.apache.spark.{SparkConf, SparkException}

class StokerAuthTest extends Checks {

  private def tempToken(text: String): Path = {
    val f = Files.createTempFile("stoker-token", "")
    Files.writeString(f, text)
    f.toFile.deleteOnExit()
    f
  }

  @Test def tokensComeFromTheConfTheFileOrTheDefaultFile(): Unit = {
    eq(None, StokerAuth.fromConf(new SparkConf(false), defaultFile = "/nonexistent/token"))
    val literal = StokerAuth.fromConf(new SparkConf(false).set(StokerAuth.Token, " abc "))
    eq("abc", literal.map(_.current()).orNull)
    val file = tempToken("from-file\n")
    eq("from-file", StokerAuth.fromConf(new SparkConf(false).set(StokerAuth.TokenFile, file.toString))
      .map(_.current()).orNull)
    val default = tempToken("projected")
    eq("projected", StokerAuth.fromConf(new SparkConf(false), defaultFile = default.toString)
      .map(_.current()).orNull)
  }

  @Test def aRotatedTokenFileIsReadAgain(): Unit = {
    val file = tempToken("first")
    val token = BearerToken.file(file)
    eq("first", token.current())
    Files.writeString(file, "second")
    Files.setLastModifiedTime(file, FileTime.fromMillis(Files.getLastModifiedTime(file).toMillis + 5000))
    eq("second", token.current())
  }

  @Test def unusableTokenFilesAreRefusedNamingTheKey(): Unit = {
    for ((path, why) <- Seq(tempToken("") -> "is empty", tempToken("two tokens") -> "one token",
      Path.of("/nonexistent/t") -> "cannot read")) {
      val e = intercept[SparkException](StokerAuth.fromConf(
        new SparkConf(false).set(StokerAuth.TokenFile, path.toString)))
      check(e.getMessage.contains(StokerAuth.TokenFile) && e.getMessage.contains(why), e.getMessage)
    }
  }

  @Test def aTokenIsNeverSentInPlaintextToAnotherHost(): Unit = {
    val token = Some(BearerToken.literal("t"))
    val remote = StokerMaster.parse("stoker://127.0.0.1:1,stoker.example.com:7077")
    val e = intercept[SparkException](StokerAuth.checkTransport(new SparkConf(false), remote, token))
    check(e.getMessage.contains("stoker.example.com:7077") && e.getMessage.contains(StokerAuth.TlsEnabled),
      e.getMessage)
    check(!e.getMessage.contains("127.0.0.1:1"), "loopback is fine: " + e.getMessage)
    StokerAuth.checkTransport(new SparkConf(false).set(StokerAuth.TlsEnabled, "true"), remote, token)
    StokerAuth.checkTransport(new SparkConf(false).set(StokerAuth.AllowPlaintext, "true"), remote, token)
    StokerAuth.checkTransport(new SparkConf(false), StokerMaster.parse("stoker://localhost:7077"), token)
    StokerAuth.checkTransport(new SparkConf(false), remote, None)
  }

  @Test def everyCallCarriesTheCurrentBearerToken(): Unit = {
    val seen = new ConcurrentLinkedQueue[String]()
    val record = new ServerInterceptor {
      override def interceptCall[Q, R](call: ServerCall[Q, R], headers: Metadata,
          next: ServerCallHandler[Q, R]): ServerCall.Listener[Q] = {
        seen.add(headers.get(Metadata.Key.of("authorization", Metadata.ASCII_STRING_MARSHALLER)))
        next.startCall(call, headers)
      }
    }
    val server = NettyServerBuilder.forAddress(new InetSocketAddress("127.0.0.1", 0))
      .addService(ServerInterceptors.intercept(new FakeStoker("i"), record)).build().start()
    val channel = NettyChannelBuilder.forAddress("127.0.0.1", server.getPort).usePlaintext().build()
    val file = tempToken("one")
    val token = BearerToken.file(file)
    try {
      val stub = ExecutorAllocatorGrpc.newBlockingStub(channel)
        .withInterceptors(StokerAuth.interceptor(token))
      val register = RegisterApplicationRequest.newBuilder().setAppId("a").setToken("t").build()
      stub.withDeadlineAfter(10, TimeUnit.SECONDS).registerApplication(register)
      Files.writeString(file, "two")
      Files.setLastModifiedTime(file, FileTime.fromMillis(Files.getLastModifiedTime(file).toMillis + 5000))
      stub.withDeadlineAfter(10, TimeUnit.SECONDS).registerApplication(register)
      eq(Seq("Bearer one", "Bearer two"), seen.asScala.toSeq)
    } finally {
      channel.shutdownNow().awaitTermination(10, TimeUnit.SECONDS)
      server.shutdownNow().awaitTermination(10, TimeUnit.SECONDS)
    }
  }
}
