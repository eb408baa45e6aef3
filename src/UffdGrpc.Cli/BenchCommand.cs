using System.CommandLine;
using System.Diagnostics;
using System.Globalization;
using UffdGrpc.Client;

namespace UffdGrpc.Cli;

/// <summary>
/// <c>bench</c>: one fault round trip over the API — a write to a write-protected page
/// blocks in the userfault, the event is delivered to a handler's stream, the handler
/// un-protects, the access returns — timed from the Access call to its return.
/// </summary>
internal static class BenchCommand
{
    private const ulong A = 0x7e00_0000_0000;
    private const ulong Page = 4096;

    public static Command Build()
    {
        var server = new Option<string>("--server") { Description = "UffdGrpc server URL", DefaultValueFactory = _ => CliCommands.DefaultServer };
        var n = new Option<int>("--iterations") { Description = "Timed round trips", DefaultValueFactory = _ => 2000 };
        var warmup = new Option<int>("--warmup") { Description = "Untimed round trips first", DefaultValueFactory = _ => 200 };
        var cmd = new Command("bench", "Measure one fault round trip (event delivered -> handler resolves -> access returns): p50/p99.") { server, n, warmup };
        cmd.SetAction((parse, ct) => CliCommands.GuardAsync("bench", () => RunAsync(parse.GetValue(server)!, parse.GetValue(n), parse.GetValue(warmup), ct)));
        return cmd;
    }

    private static async Task<int> RunAsync(string url, int iterations, int warmup, CancellationToken ct)
    {
        if (iterations <= 0 || warmup < 0)
        {
            await Console.Error.WriteLineAsync("bench: --iterations must be positive and --warmup not negative").ConfigureAwait(false);
            return 1;
        }
        // Two connections: the guest's and the handler's, as two processes would have.
        using var guest = new UffdClient(url);
        using var handlerClient = new UffdClient(url);
        var machine = (await guest.CreateMachineAsync(ct: ct).ConfigureAwait(false)).MachineId;
        using var stop = CancellationTokenSource.CreateLinkedTokenSource(ct);
        try
        {
            var mm = await guest.CreateMmAsync(machine, ct).ConfigureAwait(false);
            var thread = (await guest.CreateThreadAsync(mm, ct).ConfigureAwait(false)).ThreadId;
            Expect(await guest.MmapAsync(mm, A, Page, 3, ct: ct).ConfigureAwait(false), "mmap");
            await guest.WriteAsync(thread, A, 1, ct: ct).ConfigureAwait(false);
            var (e, uffd) = await guest.CreateUffdAsync(mm, ct: ct).ConfigureAwait(false);
            Expect(e, "userfaultfd");
            Expect((await guest.ApiAsync(uffd, ct: ct).ConfigureAwait(false)).Errno, "UFFDIO_API");
            Expect((await guest.RegisterAsync(uffd, A, Page, 2, ct).ConfigureAwait(false)).Errno, "UFFDIO_REGISTER");
            var loop = new FaultHandlerLoop(handlerClient, uffd);
            var serving = loop.RunAsync(stop.Token);
            var samples = new double[iterations];
            for (var i = -warmup; i < iterations; i++)
            {
                Expect(await guest.WriteprotectAsync(uffd, A, Page, 1, ct).ConfigureAwait(false), "UFFDIO_WRITEPROTECT");
                var sw = Stopwatch.StartNew();
                var r = await guest.WriteAsync(thread, A, (byte)i, ct: ct).ConfigureAwait(false);
                sw.Stop();
                if (r.Signal != Contracts.V1.SignalCode.None || r.Errno.Number != 0)
                    throw new InvalidOperationException($"write failed: {r}");
                if (i >= 0)
                    samples[i] = sw.Elapsed.TotalMicroseconds;
            }
            // The last access returned when the handler's ioctl did; let it finish counting.
            var deadline = Stopwatch.StartNew();
            while (loop.Handled < iterations + warmup && deadline.Elapsed < TimeSpan.FromSeconds(10))
                await Task.Delay(1, ct).ConfigureAwait(false);
            await stop.CancelAsync().ConfigureAwait(false);
            try
            {
                await serving.ConfigureAwait(false);
            }
            catch (Exception ex) when (ex is OperationCanceledException or Grpc.Core.RpcException { StatusCode: Grpc.Core.StatusCode.Cancelled })
            {
            }
            if (loop.Handled != iterations + warmup)
                throw new InvalidOperationException($"the handler resolved {loop.Handled} faults, expected {iterations + warmup}");
            Array.Sort(samples);
            var inv = CultureInfo.InvariantCulture;
            Console.Out.WriteLine(string.Create(inv, $"fault round trip over {url} ({iterations} timed, {warmup} warm-up; WP write -> event stream -> UFFDIO_WRITEPROTECT -> access returns)"));
            Console.Out.WriteLine(string.Create(inv, $"p50 {Percentile(samples, 0.50):F0} us  p99 {Percentile(samples, 0.99):F0} us  mean {samples.Average():F0} us  min {samples[0]:F0} us  max {samples[^1]:F0} us"));
            return 0;
        }
        finally
        {
            await stop.CancelAsync().ConfigureAwait(false);
            await guest.DestroyMachineAsync(machine, CancellationToken.None).ConfigureAwait(false);
        }
    }

    private static double Percentile(double[] sorted, double p) => sorted[Math.Clamp((int)Math.Ceiling(p * sorted.Length) - 1, 0, sorted.Length - 1)];

    private static void Expect(Errno e, string what)
    {
        if (e != Errno.OK)
            throw new UffdErrnoException($"{what}: {e}");
    }
}
