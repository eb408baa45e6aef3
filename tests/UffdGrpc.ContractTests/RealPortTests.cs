using Grpc.Health.V1;
using Grpc.Net.Client;
using Grpc.Reflection.V1Alpha;
using Xunit.Abstractions;

namespace UffdGrpc.ContractTests;

/// <summary>One server process on a real Kestrel port (127.0.0.1, port 0), shared by these tests.</summary>
public sealed class ServerProcessFixture : IAsyncLifetime
{
    public ServerProcess Server { get; private set; } = null!;

    public async Task InitializeAsync() => Server = await ServerProcess.StartAsync();

    public async Task DisposeAsync() => await Server.DisposeAsync();
}

/// <summary>The server as the README runs it: h2c on a real port, health, reflection, and a non-.NET client.</summary>
public class RealPortTests(ServerProcessFixture fx, ITestOutputHelper output) : IClassFixture<ServerProcessFixture>
{
    [Fact]
    public async Task A_copy_payload_up_to_the_documented_64_MiB_passes_Kestrel_and_one_over_is_refused_with_resource_exhausted()
    {
        using var c = new UffdClient(fx.Server.Address);
        const ulong len = 48UL << 20; // past Kestrel's default 30 MB body limit, within the API's 64 MiB
        await using var s = await CreateAsync(c);
        Assert.True((await c.MmapAsync(s.Mm, A, len, 3)).IsOk());
        var (e, uffd) = await c.CreateUffdAsync(s.Mm);
        Assert.True(e.IsOk());
        Assert.True((await c.ApiAsync(uffd)).Errno.IsOk());
        Assert.True((await c.RegisterAsync(uffd, A, len, 1)).Errno.IsOk());
        var data = new byte[len];
        data.AsSpan().Fill(0x3c);
        var r = await c.CopyAsync(uffd, A, data);
        Assert.Equal((Errno.Unspecified, (long?)(long)len), (r.Errno, r.Field));
        Assert.Equal(0x3c, (await c.ReadAsync(s.Thread, A + len - Page)).Values[0]);
        var over = await Assert.ThrowsAsync<RpcException>(() => c.CopyAsync(uffd, A, new byte[(64 << 20) + (128 << 10)]));
        Assert.Equal(StatusCode.ResourceExhausted, over.StatusCode);
    }

    [Fact]
    public async Task Kestrel_serves_h2c_where_urls_says_and_a_fault_round_trip_works()
    {
        // Arrange
        using var channel = GrpcChannel.ForAddress(fx.Server.Address);
        using var c = new UffdClient(channel);
        await using var s = await CreateAsync(c, pages: 1, registerMode: 2);
        await c.WriteAsync(s.Thread, A, 0x11);
        Assert.Equal(Errno.Unspecified, await c.WriteprotectAsync(s.Uffd, A, Page, 1));
        using var stop = new CancellationTokenSource();
        var seen = new List<UffdMsg>();
        var handler = new FaultHandlerLoop(new UffdClient(channel), s.Uffd) { OnMessage = seen.Add };
        var serving = handler.RunAsync(stop.Token);

        // Act
        var r = await c.WriteAsync(s.Thread, A, 0x22).WaitAsync(TimeSpan.FromSeconds(30));
        await stop.CancelAsync();
        await Assert.ThrowsAnyAsync<Exception>(() => serving);

        // Assert
        Assert.StartsWith("http://127.0.0.1:", fx.Server.Address, StringComparison.Ordinal);
        Assert.Equal("ok", r.Errno.Name());
        Assert.True(Assert.Single(seen).Pagefault is { Wp: true, Write: true });
        Assert.Equal(0x22, (await c.ReadAsync(s.Thread, A)).Values[0]);
    }

    [Fact]
    public async Task An_event_stream_with_a_deadline_ends_with_DeadlineExceeded_and_the_server_stops_reading()
    {
        using var channel = GrpcChannel.ForAddress(fx.Server.Address);
        using var c = new UffdClient(channel);
        await using var s = await CreateAsync(c, pages: 1, registerMode: 1);

        using var timed = c.Uffd.ReadEvents(new ReadEventsRequest { UffdId = s.Uffd }, deadline: DateTime.UtcNow.AddMilliseconds(300));
        var de = await Assert.ThrowsAsync<Grpc.Core.RpcException>(() => timed.ResponseStream.MoveNext(CancellationToken.None));
        await EventuallyAsync(async () => (await c.PollAsync(s.Uffd)).Readers == 0, "the server ended the stream");

        Assert.Equal(Grpc.Core.StatusCode.DeadlineExceeded, de.StatusCode);
    }

    [Fact]
    public async Task Health_reports_serving()
    {
        using var channel = GrpcChannel.ForAddress(fx.Server.Address);
        var health = new Health.HealthClient(channel);

        var r = await health.CheckAsync(new HealthCheckRequest());

        Assert.Equal(HealthCheckResponse.Types.ServingStatus.Serving, r.Status);
    }

    [Fact]
    public async Task Reflection_lists_the_services_and_serves_their_descriptors()
    {
        using var channel = GrpcChannel.ForAddress(fx.Server.Address);
        var reflection = new ServerReflection.ServerReflectionClient(channel);
        using var call = reflection.ServerReflectionInfo();

        await call.RequestStream.WriteAsync(new ServerReflectionRequest { ListServices = "" });
        Assert.True(await call.ResponseStream.MoveNext(CancellationToken.None));
        var services = call.ResponseStream.Current.ListServicesResponse.Service.Select(x => x.Name).ToList();
        await call.RequestStream.WriteAsync(new ServerReflectionRequest { FileContainingSymbol = "uffd.v1.UserfaultfdService" });
        Assert.True(await call.ResponseStream.MoveNext(CancellationToken.None));
        var files = call.ResponseStream.Current.FileDescriptorResponse.FileDescriptorProto
            .Select(b => Google.Protobuf.Reflection.FileDescriptorProto.Parser.ParseFrom(b)).ToList();
        await call.RequestStream.CompleteAsync();

        Assert.Contains("uffd.v1.MachineService", services);
        Assert.Contains("uffd.v1.MmService", services);
        Assert.Contains("uffd.v1.ThreadService", services);
        Assert.Contains("uffd.v1.UserfaultfdService", services);
        Assert.Contains("grpc.health.v1.Health", services);
        var uffd = files.Single(f => f.Name == "uffd/v1/userfaultfd.proto");
        Assert.Equal("UserfaultfdService", uffd.Service.Single().Name);
        Assert.Contains(uffd.Service.Single().Method, m => m.Name == "ReadEvents" && m.ServerStreaming && !m.ClientStreaming);
        Assert.Contains(uffd.Service.Single().Method, m => m.Name == "Serve" && m.ServerStreaming && m.ClientStreaming);
        var copy = uffd.MessageType.Single(m => m.Name == "UffdioCopyResponse");
        Assert.Equal(".uffd.v1.Errno", copy.Field.Single(f => f.Name == "errno").TypeName);
        Assert.Equal(".google.protobuf.Int64Value", copy.Field.Single(f => f.Name == "copy").TypeName);
    }

    /// <summary>
    /// Any-language use: Debian's python3-grpcio with stubs generated from protos/ by
    /// python3-grpc-tools drives the whole story (health, map, register WP, write-protect, a
    /// blocked write, the fault read from the stream, the resolution, the write completing),
    /// then sees a failed ioctl answer OK with its errno in-band and an unknown id as NOT_FOUND.
    /// </summary>
    [Fact]
    public async Task A_python_client_generated_from_protos_serves_a_fault()
    {
        // Arrange: generate the stubs into a temporary directory.
        var python = "/usr/bin/python3";
        Assert.True(File.Exists(python), "python3 is missing (.ci/apt-packages installs python3-grpcio and python3-grpc-tools)");
        var protos = Path.Combine(RepoRoot(), "protos");
        var outDir = Directory.CreateTempSubdirectory("uffd-py-").FullName;
        try
        {
            var protoFiles = Directory.GetFiles(Path.Combine(protos, "uffd", "v1"), "*.proto").Select(p => Path.GetRelativePath(protos, p));
            var (gen, genOut) = await RunAsync(python, ["-m", "grpc_tools.protoc", "-I", protos, "--python_out", outDir, "--grpc_python_out", outDir, .. protoFiles], protos);
            Assert.True(gen == 0, "grpc_tools.protoc failed: " + genOut);

            // Act
            var script = Path.Combine(AppContext.BaseDirectory, "python", "uffd_client.py");
            var (rc, text) = await RunAsync(python, [script, fx.Server.Address.Replace("http://", "", StringComparison.Ordinal), outDir], outDir);
            output.WriteLine(text);

            // Assert
            Assert.True(rc == 0, "the python client failed:\n" + text);
            Assert.Contains("health: SERVING", text, StringComparison.Ordinal);
            Assert.Contains("event: pagefault WRITE|WP", text, StringComparison.Ordinal);
            Assert.Contains("write blocked while the fault is unresolved: True", text, StringComparison.Ordinal);
            Assert.Contains("write completed: ok, value 0x22", text, StringComparison.Ordinal);
            Assert.Contains("serve: 1 fault(s) read, results 0:ok/- 99:EEXIST/-17", text, StringComparison.Ordinal);
            Assert.Contains("serve write completed: ok", text, StringComparison.Ordinal);
            Assert.Contains("second UFFDIO_API: status OK, errno EINVAL", text, StringComparison.Ordinal);
            Assert.Contains("unknown uffd: NOT_FOUND", text, StringComparison.Ordinal);
            Assert.Contains("injected mmap_changing: WRITEPROTECT EAGAIN, log 1 firing(s)", text, StringComparison.Ordinal);
        }
        finally
        {
            Directory.Delete(outDir, recursive: true);
        }
    }
}
