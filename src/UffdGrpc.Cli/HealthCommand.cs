using System.CommandLine;
using Grpc.Core;
using Grpc.Health.V1;
using Grpc.Net.Client;

namespace UffdGrpc.Cli;

/// <summary>
/// <c>health</c>: grpc.health.v1.Health/Check against a server — the probe of the compose
/// file's health checks and of scripts that wait for a server to come up.
/// </summary>
internal static class HealthCommand
{
    public static Command Build()
    {
        var server = new Option<string>("--server") { Description = "UffdGrpc server URL", DefaultValueFactory = _ => CliCommands.DefaultServer };
        var wait = new Option<double>("--wait") { Description = "Keep trying for this many seconds until the server answers SERVING (default 0: one try)" };
        var cmd = new Command("health", "Check grpc.health.v1.Health: print the status; exit 0 only when SERVING.") { server, wait };
        cmd.SetAction((parse, ct) => RunAsync(parse.GetValue(server)!, TimeSpan.FromSeconds(parse.GetValue(wait)), ct));
        return cmd;
    }

    private static async Task<int> RunAsync(string url, TimeSpan wait, CancellationToken ct)
    {
        using var channel = GrpcChannel.ForAddress(url);
        var client = new Health.HealthClient(channel);
        var until = DateTime.UtcNow + wait;
        while (true)
        {
            string status;
            try
            {
                var r = await client.CheckAsync(new HealthCheckRequest(), deadline: DateTime.UtcNow.AddSeconds(2), cancellationToken: ct).ConfigureAwait(false);
                if (r.Status == HealthCheckResponse.Types.ServingStatus.Serving)
                {
                    await Console.Out.WriteLineAsync($"{url}: SERVING").ConfigureAwait(false);
                    return 0;
                }
                status = r.Status.ToString();
            }
            catch (RpcException e)
            {
                status = $"{e.StatusCode}: {e.Status.Detail}";
            }
            if (DateTime.UtcNow >= until)
            {
                await Console.Error.WriteLineAsync($"health: {url}: {status}").ConfigureAwait(false);
                return 1;
            }
            await Task.Delay(250, ct).ConfigureAwait(false);
        }
    }
}
