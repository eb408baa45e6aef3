using System.Text;
using Grpc.Net.Client;
using Microsoft.AspNetCore.Hosting;
using Microsoft.AspNetCore.Mvc.Testing;
using Microsoft.Extensions.Logging;
using UffdGrpc.Client;
using UffdGrpc.Mm;
using UffdGrpc.Scenarios;
using Xunit.Abstractions;

namespace UffdGrpc.ConformanceTests;

/// <summary>A UffdGrpc server on an in-memory HTTP/2 test server, shared by the server-mode suite.</summary>
public sealed class TestServerFixture : WebApplicationFactory<Program>
{
    private GrpcChannel? _channel;

    public GrpcChannel Channel => _channel ??= GrpcChannel.ForAddress(Server.BaseAddress, new GrpcChannelOptions
    {
        HttpHandler = Server.CreateHandler(),
        MaxReceiveMessageSize = 64 << 20,
    });

    /// <summary>The test output shows the server's warnings and errors only, not its Information lines.</summary>
    protected override void ConfigureWebHost(IWebHostBuilder builder) =>
        builder.ConfigureLogging(l => l.ClearProviders().AddConsole().AddFilter<Microsoft.Extensions.Logging.Console.ConsoleLoggerProvider>((_, level) => level >= LogLevel.Warning));

    protected override void Dispose(bool disposing)
    {
        _channel?.Dispose();
        base.Dispose(disposing);
    }
}

/// <summary>
/// The conformance suite in <c>--server</c> mode: every scenario replayed through the
/// gRPC backend (the client SDK over a real HTTP/2 channel) against a test server, and
/// compared with the same real-kernel golden trace as the in-process suite.
/// </summary>
public class ServerModeSuite(TestServerFixture server, ITestOutputHelper output) : IClassFixture<TestServerFixture>
{
    internal static async Task<string> ReplayAsync(TestServerFixture fixture, string path, KernelProfile profile = KernelProfile.V6_18)
    {
        var sw = new StringWriter { NewLine = "\n" };
        using var client = new UffdClient(fixture.Channel);
        await using var backend = new GrpcBackend(client, profile);
        using var reader = new StreamReader(path);
        await new ScenarioInterpreter(backend, sw).RunAsync(reader);
        return sw.ToString();
    }

    [Theory]
    [MemberData(nameof(ConformanceSuite.Scenarios), MemberType = typeof(ConformanceSuite))]
    public async Task Scenario_replays_the_real_kernel_trace_over_grpc(string suite, string name)
    {
        var path = Path.Combine(suite == "shared" ? ScenarioFolders.Shared! : ScenarioFolders.Project, name);
        var expected = await File.ReadAllTextAsync(Path.ChangeExtension(path, ".out"));
        var actual = await ReplayAsync(server, path);
        var diff = Replay.FirstDifference(expected, actual);
        Assert.True(diff is null, $"{suite}/{name} over gRPC: {diff}");
    }

    /// <summary>
    /// Over gRPC every scenario prints its golden trace and the same trace as in-process; the
    /// server forgets each replay's machine. Written to artifacts/conformance-server-report.txt.
    /// </summary>
    [Fact]
    public async Task Server_mode_report_matches_goldens_and_the_in_process_backend()
    {
        var report = new StringBuilder();
        if (ScenarioFolders.Shared is null)
            report.Append("NOTE shared/conformance/scenarios not found beside the repository: only the project's own scenarios run\n");
        int pass = 0, fail = 0, differ = 0;
        foreach (var (suite, path) in ScenarioFolders.All())
        {
            var name = $"{suite}/{Path.GetFileNameWithoutExtension(path)}";
            var golden = await File.ReadAllTextAsync(Path.ChangeExtension(path, ".out"));
            var overGrpc = await ReplayAsync(server, path);
            var diff = Replay.FirstDifference(golden, overGrpc);
            if (diff is null)
            {
                pass++;
            }
            else
            {
                fail++;
                report.Append($"FAIL {name} over gRPC: {diff}\n");
            }
            var backends = Replay.FirstDifference(await Replay.RunAsync(path), overGrpc);
            if (backends is not null)
            {
                differ++;
                report.Append($"DIFFER {name}: in-process vs gRPC: {backends}\n");
            }
        }
        report.Append($"conformance --server: {pass} passed, {fail} failed; {differ} differ from in-process\n");
        output.WriteLine(report.ToString());
        var artifacts = Path.Combine(ScenarioFolders.RepoRoot, "artifacts");
        Directory.CreateDirectory(artifacts);
        await File.WriteAllTextAsync(Path.Combine(artifacts, "conformance-server-report.txt"), report.ToString());
        using var client = new UffdClient(server.Channel);
        var machines = await client.Machines.ListMachinesAsync(new Contracts.V1.ListMachinesRequest());
        Assert.Empty(machines.Machines);
        Assert.True(pass > 0, "no scenario ran");
        Assert.Equal(0, fail);
        Assert.Equal(0, differ);
    }
}
