using System.CommandLine;
using System.Diagnostics;
using System.Globalization;
using UffdGrpc.Client;
using UffdGrpc.Contracts.V1;

namespace UffdGrpc.Cli;

/// <summary>
/// <c>bench --server URL</c>: the fault round trip over the API — a write to a
/// write-protected page blocks in the userfault, the message reaches a handler, the handler
/// un-protects, the access returns — timed from the Access call to its return, in three
/// shapes: a ReadEvents stream with a unary UFFDIO_WRITEPROTECT, the Serve stream one fault
/// at a time, and Serve with 64 threads faulting at once (resolved in batches).
/// </summary>
internal static class BenchCommand
{
    private const ulong A = 0x7e00_0000_0000;
    private const ulong Page = 4096;

    public static Command Build()
    {
        var server = new Option<string>("--server") { Description = "UffdGrpc server URL", DefaultValueFactory = _ => UffdClient.DefaultAddress };
        var n = new Option<int>("--iterations") { Description = "Timed round trips per shape", DefaultValueFactory = _ => 2000 };
        var warmup = new Option<int>("--warmup") { Description = "Untimed round trips first", DefaultValueFactory = _ => 500 };
        var shape = new Option<string>("--shape") { Description = "unary, serve, serve64 or all", DefaultValueFactory = _ => "all" };
        var cmd = new Command("bench", "Measure the fault round trip over the API (event -> handler resolves -> access returns): p50/p99 per shape.") { server, n, warmup, shape };
        cmd.SetAction((parse, ct) => CliCommands.GuardAsync("bench", () => RunAsync(parse.GetValue(server)!, parse.GetValue(n), parse.GetValue(warmup), parse.GetValue(shape)!, ct)));
        return cmd;
    }

    private static async Task<int> RunAsync(string url, int iterations, int warmup, string shape, CancellationToken ct)
    {
        if (iterations <= 0 || warmup < 0 || shape is not ("unary" or "serve" or "serve64" or "all"))
        {
            await Console.Error.WriteLineAsync("bench: --iterations must be positive, --warmup not negative, --shape unary|serve|serve64|all").ConfigureAwait(false);
            return 1;
        }
        // Two connections: the guest's and the handler's, as two processes would have.
        using var guest = CliCommands.Connect(url);
        using var handler = CliCommands.Connect(url);
        var inv = CultureInfo.InvariantCulture;
        Console.Out.WriteLine(string.Create(inv, $"fault round trip over {url} ({iterations} timed after {warmup} warm-up; WP write -> message -> un-protect -> access returns)"));
        Console.Out.WriteLine("shape                      p50 us   p99 us  mean us   faults/s");
        foreach (var s in shape == "all" ? ["unary", "serve", "serve64"] : new[] { shape })
        {
            var threads = s == "serve64" ? 64 : 1;
            var (samples, seconds) = await MeasureAsync(guest, handler, s, threads, iterations, warmup, ct).ConfigureAwait(false);
            Array.Sort(samples);
            var label = s switch { "unary" => "ReadEvents + unary WP", "serve" => "Serve, batch 1", _ => "Serve, 64 threads" };
            Console.Out.WriteLine(string.Create(inv, $"{label,-24} {Percentile(samples, 0.50),8:F0} {Percentile(samples, 0.99),8:F0} {samples.Average(),8:F0} {samples.Length / seconds,10:F0}"));
        }
        return 0;
    }

    /// <summary>One machine, <paramref name="threads"/> threads each writing its own WP page in a loop; returns the per-access latencies (µs) and the timed wall time.</summary>
    private static async Task<(double[] Samples, double Seconds)> MeasureAsync(UffdClient guest, UffdClient handler, string shape, int threads, int iterations, int warmup, CancellationToken ct)
    {
        var machine = (await guest.CreateMachineAsync(ct: ct).ConfigureAwait(false)).MachineId;
        using var stop = CancellationTokenSource.CreateLinkedTokenSource(ct);
        try
        {
            var mm = await guest.CreateMmAsync(machine, ct).ConfigureAwait(false);
            var len = Page * (ulong)threads;
            (await guest.MmapAsync(mm, A, len, 3, ct: ct).ConfigureAwait(false)).Expect("mmap");
            var tids = new long[threads];
            for (var t = 0; t < threads; t++)
            {
                tids[t] = (await guest.CreateThreadAsync(mm, ct).ConfigureAwait(false)).ThreadId;
                await guest.WriteAsync(tids[t], A + ((ulong)t * Page), 1, ct: ct).ConfigureAwait(false);
            }
            var (e, uffd) = await guest.CreateUffdAsync(mm, ct: ct).ConfigureAwait(false);
            e.Expect("userfaultfd");
            (await guest.ApiAsync(uffd, ct: ct).ConfigureAwait(false)).Errno.Expect("UFFDIO_API");
            (await guest.RegisterAsync(uffd, A, len, 2, ct).ConfigureAwait(false)).Errno.Expect("UFFDIO_REGISTER");
            var serving = shape == "unary" ? UnaryHandlerAsync(handler, uffd, stop.Token) : new FaultHandlerLoop(handler, uffd).RunAsync(stop.Token);
            var perThread = (iterations + threads - 1) / threads;
            var warm = (warmup + threads - 1) / threads;
            var samples = new double[perThread * threads];
            var wall = new Stopwatch();
            using var barrier = new Barrier(threads, _ => { });
            async Task Worker(int t)
            {
                var page = A + ((ulong)t * Page);
                for (var i = -warm; i < perThread; i++)
                {
                    if (i == 0 && t == 0)
                        wall.Start();
                    (await guest.WriteprotectAsync(uffd, page, Page, 1, ct).ConfigureAwait(false)).Expect("UFFDIO_WRITEPROTECT");
                    var sw = Stopwatch.StartNew();
                    var r = await guest.WriteAsync(tids[t], page, (byte)i, ct: ct).ConfigureAwait(false);
                    sw.Stop();
                    if (r.Signal != SignalCode.Unspecified || !r.Errno.IsOk())
                        throw new InvalidOperationException($"write failed: {r}");
                    if (i >= 0)
                        samples[(t * perThread) + i] = sw.Elapsed.TotalMicroseconds;
                }
            }
            await Task.WhenAll(Enumerable.Range(0, threads).Select(t => Task.Run(() => Worker(t), ct))).ConfigureAwait(false);
            wall.Stop();
            await stop.CancelAsync().ConfigureAwait(false);
            try
            {
                await serving.ConfigureAwait(false);
            }
            catch (Exception ex) when (ex is OperationCanceledException or Grpc.Core.RpcException { StatusCode: Grpc.Core.StatusCode.Cancelled })
            {
            }
            return (samples, wall.Elapsed.TotalSeconds);
        }
        finally
        {
            await stop.CancelAsync().ConfigureAwait(false);
            await guest.DestroyMachineAsync(machine, CancellationToken.None).ConfigureAwait(false);
        }
    }

    /// <summary>The unary handler: a ReadEvents stream, one UFFDIO_WRITEPROTECT call per fault.</summary>
    private static async Task UnaryHandlerAsync(UffdClient c, long uffd, CancellationToken ct)
    {
        await foreach (var msg in c.ReadEventsAsync(uffd, ct).ConfigureAwait(false))
        {
            if (msg.Pagefault is { } pf)
                (await c.WriteprotectAsync(uffd, pf.Address & ~(Page - 1), Page, 0, ct).ConfigureAwait(false)).Expect("UFFDIO_WRITEPROTECT");
        }
    }

    private static double Percentile(double[] sorted, double p) => sorted[Math.Clamp((int)Math.Ceiling(p * sorted.Length) - 1, 0, sorted.Length - 1)];
}
