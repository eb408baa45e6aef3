using System.Diagnostics;
using UffdGrpc.Client;
using UffdGrpc.Contracts.V1;

namespace UffdGrpc.Cli.Bench;

/// <summary>
/// The over-the-wire measurements, the same code against the product server and the floor:
/// the fault round trip (one thread; a ReadEvents stream with a unary UFFDIO_WRITEPROTECT, or
/// Serve one fault at a time) and resolved faults per second with threads faulting
/// server-side (StartOp touches of many write-protected pages, so no guest RPC per fault)
/// served by Serve handler streams.
/// </summary>
internal static class Transport
{
    private const ulong A = 0x7e00_0000_0000;
    private const ulong Page = 4096;

    /// <summary>Per-access latencies (µs) of <paramref name="iterations"/> timed round trips after <paramref name="warmup"/> untimed ones.</summary>
    public static async Task<double[]> RoundTripAsync(string url, bool serve, int iterations, int warmup, CancellationToken ct)
    {
        await using var session = await RoundTripSession.OpenAsync(url, serve, ct).ConfigureAwait(false);
        await session.MeasureAsync(warmup, null, ct).ConfigureAwait(false);
        var samples = new List<double>(iterations);
        await session.MeasureAsync(iterations, samples, ct).ConfigureAwait(false);
        var sorted = samples.ToArray();
        Array.Sort(sorted);
        return sorted;
    }

    /// <summary>
    /// The round trips of two servers measured in alternating blocks of <paramref name="block"/>
    /// on sessions opened side by side, so that whatever else the machine runs meanwhile lands
    /// on both servers alike; each server's latencies (µs) sorted.
    /// </summary>
    public static async Task<(double[] A, double[] B)> InterleavedRoundTripsAsync(string a, string b, bool serve, int iterations, int warmup, int block, CancellationToken ct)
    {
        await using var sa = await RoundTripSession.OpenAsync(a, serve, ct).ConfigureAwait(false);
        await using var sb = await RoundTripSession.OpenAsync(b, serve, ct).ConfigureAwait(false);
        await sa.MeasureAsync(warmup, null, ct).ConfigureAwait(false);
        await sb.MeasureAsync(warmup, null, ct).ConfigureAwait(false);
        var la = new List<double>(iterations);
        var lb = new List<double>(iterations);
        for (var done = 0; done < iterations; done += block)
        {
            var n = Math.Min(block, iterations - done);
            // Alternate which server goes first, so neither always follows the other's block.
            var (first, second, lf, ls) = (done / block) % 2 == 0 ? (sa, sb, la, lb) : (sb, sa, lb, la);
            await first.MeasureAsync(n, lf, ct).ConfigureAwait(false);
            await second.MeasureAsync(n, ls, ct).ConfigureAwait(false);
        }
        var ra = la.ToArray();
        var rb = lb.ToArray();
        Array.Sort(ra);
        Array.Sort(rb);
        return (ra, rb);
    }

    /// <summary>
    /// One guest and one handler on a server (each its own connection, as two processes would
    /// have): a machine with one page registered for WP, a thread that writes it and a handler
    /// (a ReadEvents stream with a unary UFFDIO_WRITEPROTECT, or Serve one fault at a time)
    /// that un-protects each fault. A round trip re-protects the page (untimed), then times the
    /// write's Access call: fault, event, un-protect, wake, the access's reply.
    /// </summary>
    private sealed class RoundTripSession : IAsyncDisposable
    {
        private readonly UffdClient _guest, _handler;
        private readonly CancellationTokenSource _stop = new();
        private long _machine, _tid, _uffd;
        private Task _serving = Task.CompletedTask;
        private int _value;

        private RoundTripSession(string url)
        {
            _guest = CliCommands.Connect(url);
            _handler = CliCommands.Connect(url);
        }

        public static async Task<RoundTripSession> OpenAsync(string url, bool serve, CancellationToken ct)
        {
            var s = new RoundTripSession(url);
            try
            {
                var g = s._guest;
                s._machine = (await g.CreateMachineAsync(ct: ct).ConfigureAwait(false)).MachineId;
                var mm = await g.CreateMmAsync(s._machine, ct).ConfigureAwait(false);
                (await g.MmapAsync(mm, A, Page, 3, ct: ct).ConfigureAwait(false)).Expect("mmap");
                s._tid = (await g.CreateThreadAsync(mm, ct).ConfigureAwait(false)).ThreadId;
                await g.WriteAsync(s._tid, A, 1, ct: ct).ConfigureAwait(false);
                s._uffd = await OpenUffdAsync(g, mm, Page, ct).ConfigureAwait(false);
                s._serving = serve ? new FaultHandlerLoop(s._handler, s._uffd) { MaxMessages = 1 }.RunAsync(s._stop.Token) : UnaryHandlerAsync(s._handler, s._uffd, s._stop.Token);
                return s;
            }
            catch
            {
                await s.DisposeAsync().ConfigureAwait(false);
                throw;
            }
        }

        /// <summary><paramref name="n"/> round trips; their latencies (µs) go to <paramref name="samples"/> unless it is null (warm-up).</summary>
        public async Task MeasureAsync(int n, List<double>? samples, CancellationToken ct)
        {
            for (var i = 0; i < n; i++)
            {
                (await _guest.WriteprotectAsync(_uffd, A, Page, 1, ct).ConfigureAwait(false)).Expect("UFFDIO_WRITEPROTECT");
                var s = Stopwatch.GetTimestamp();
                var r = await _guest.WriteAsync(_tid, A, (byte)++_value, ct: ct).ConfigureAwait(false);
                var e = Stopwatch.GetElapsedTime(s);
                if (r.Signal != SignalCode.Unspecified || !r.Errno.IsOk())
                    throw new InvalidOperationException($"write failed: {r}");
                samples?.Add(e.TotalMicroseconds);
            }
        }

        public async ValueTask DisposeAsync()
        {
            await StopAsync(_stop, _serving).ConfigureAwait(false);
            if (_machine != 0)
                await _guest.DestroyMachineAsync(_machine, CancellationToken.None).ConfigureAwait(false);
            _stop.Dispose();
            _guest.Dispose();
            _handler.Dispose();
        }
    }

    private static async Task<long> OpenUffdAsync(UffdClient c, long mm, ulong len, CancellationToken ct)
    {
        var (e, uffd) = await c.CreateUffdAsync(mm, ct: ct).ConfigureAwait(false);
        e.Expect("userfaultfd");
        (await c.ApiAsync(uffd, ct: ct).ConfigureAwait(false)).Errno.Expect("UFFDIO_API");
        (await c.RegisterAsync(uffd, A, len, 2, ct).ConfigureAwait(false)).Errno.Expect("UFFDIO_REGISTER");
        return uffd;
    }

    private static async Task StopAsync(CancellationTokenSource stop, Task serving)
    {
        await stop.CancelAsync().ConfigureAwait(false);
        try
        {
            await serving.ConfigureAwait(false);
        }
        catch (Exception ex) when (ex is OperationCanceledException or Grpc.Core.RpcException { StatusCode: Grpc.Core.StatusCode.Cancelled })
        {
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

    /// <summary>
    /// Resolved faults per second: <paramref name="threads"/> simulated threads spread over
    /// <paramref name="mms"/> address spaces (a uffd each), each thread touching its own run
    /// of write-protected pages (one StartOp writing byte 0, so the model allocates no page
    /// contents and the row times the fault path, not the heap), served by <paramref name="streams"/> Serve
    /// streams per uffd (each on its own connection) that un-protect every fault in one
    /// request per batch. Counted from the first 10 % of the faults (or 0.3 s) until all are
    /// resolved or <paramref name="seconds"/> more have passed.
    /// </summary>
    public static async Task<Throughput> ThroughputAsync(string url, int threads, int streams, int mms, int totalPages, double seconds, CancellationToken ct, Func<double>? serverCpu = null)
    {
        using var guest = CliCommands.Connect(url);
        var machine = (await guest.CreateMachineAsync(ct: ct).ConfigureAwait(false)).MachineId;
        using var stop = CancellationTokenSource.CreateLinkedTokenSource(ct);
        var clients = new List<UffdClient>();
        var loops = new List<Handler>();
        var serving = new List<Task>();
        try
        {
            mms = Math.Min(mms, threads);
            var perThread = Math.Max(16, totalPages / threads);
            var spaces = new (long Mm, long Uffd, List<long> Tids)[mms];
            for (var m = 0; m < mms; m++)
            {
                var n = (threads / mms) + (m < threads % mms ? 1 : 0);
                var len = (ulong)n * (ulong)perThread * Page;
                var mm = await guest.CreateMmAsync(machine, ct).ConfigureAwait(false);
                (await guest.MmapAsync(mm, A, len, 3, populate: true, ct: ct).ConfigureAwait(false)).Expect("mmap");
                var tids = new List<long>();
                for (var t = 0; t < n; t++)
                    tids.Add((await guest.CreateThreadAsync(mm, ct).ConfigureAwait(false)).ThreadId);
                var uffd = await OpenUffdAsync(guest, mm, len, ct).ConfigureAwait(false);
                (await guest.WriteprotectAsync(uffd, A, len, 1, ct).ConfigureAwait(false)).Expect("UFFDIO_WRITEPROTECT");
                spaces[m] = (mm, uffd, tids);
                for (var s = 0; s < streams; s++)
                {
                    var c = CliCommands.Connect(url);
                    clients.Add(c);
                    var loop = new Handler();
                    loops.Add(loop);
                    serving.Add(loop.RunAsync(c, uffd, stop.Token));
                }
            }
            var total = (long)threads * perThread;
            var starts = new List<Task<StartOpResponse>>();
            foreach (var (_, _, tids) in spaces)
            {
                for (var t = 0; t < tids.Count; t++)
                    starts.Add(guest.StartOpAsync(tids[t], new ThreadOp { Access = UffdClient.Touch(A + ((ulong)t * (ulong)perThread * Page), true, 0, (uint)perThread) }, ct));
            }
            await Task.WhenAll(starts).ConfigureAwait(false);
            long Handled() => loops.Sum(l => l.Handled);
            var clock = Stopwatch.StartNew();
            while (Handled() < total / 10 && clock.Elapsed.TotalSeconds < 0.3)
                await Task.Delay(1, ct).ConfigureAwait(false);
            var h0 = Handled();
            var t0 = clock.Elapsed.TotalSeconds;
            var cpu0 = serverCpu?.Invoke() ?? double.NaN;
            while (Handled() < total && clock.Elapsed.TotalSeconds - t0 < seconds)
            {
                await Task.Delay(2, ct).ConfigureAwait(false);
                foreach (var s in serving)
                {
                    if (s.IsFaulted)
                        await s.ConfigureAwait(false);
                }
            }
            var counted = Handled() - h0;
            var rate = counted / (clock.Elapsed.TotalSeconds - t0);
            var cpuPerFault = serverCpu is null ? double.NaN : (serverCpu() - cpu0) / Math.Max(1, counted);
            return new Throughput(rate, (double)Handled() / Math.Max(1, loops.Sum(l => l.Batches)), cpuPerFault);
        }
        finally
        {
            await stop.CancelAsync().ConfigureAwait(false);
            await guest.DestroyMachineAsync(machine, CancellationToken.None).ConfigureAwait(false);
            foreach (var s in serving)
            {
                try
                {
                    await s.ConfigureAwait(false);
                }
                catch (Exception ex) when (ex is OperationCanceledException or Grpc.Core.RpcException)
                {
                }
            }
            foreach (var c in clients)
                c.Dispose();
        }
    }

    /// <summary>A throughput run: resolved faults per second, faults per resolving request, and the server's CPU seconds per counted fault (NaN unless probed).</summary>
    public readonly record struct Throughput(double Rate, double MeanBatch, double ServerCpuPerFault);

    /// <summary>
    /// The batched row, product beside floor: <paramref name="rounds"/> pairs of runs, floor
    /// then product, back to back (as the round trips alternate in blocks), so a machine that
    /// slows down or speeds up mid-run moves both; each run starts once <paramref name="settle"/>
    /// says the servers are quiet. Returns the median run of each (by rate).
    /// </summary>
    public static async Task<(Throughput Product, Throughput Floor)> InterleavedThroughputAsync(string product, Func<double>? productCpu, string floor, Func<double>? floorCpu, Func<Task> settle, int rounds, int totalPages, double seconds, CancellationToken ct)
    {
        var p = new List<Throughput>();
        var f = new List<Throughput>();
        for (var i = 0; i < rounds; i++)
        {
            await settle().ConfigureAwait(false);
            f.Add(await ThroughputAsync(floor, 64, 1, 1, totalPages, seconds, ct, floorCpu).ConfigureAwait(false));
            await settle().ConfigureAwait(false);
            p.Add(await ThroughputAsync(product, 64, 1, 1, totalPages, seconds, ct, productCpu).ConfigureAwait(false));
        }
        static Throughput Median(List<Throughput> runs) => runs.OrderBy(r => r.Rate).ElementAt(runs.Count / 2);
        return (Median(p), Median(f));
    }

    /// <summary>A Serve handler that un-protects every WP fault received since its last request in one request (what <see cref="FaultHandlerLoop"/> does), counting faults and requests.</summary>
    private sealed class Handler
    {
        private long _handled, _batches;

        public long Handled => Interlocked.Read(ref _handled);
        public long Batches => Interlocked.Read(ref _batches);

        public async Task RunAsync(UffdClient c, long uffd, CancellationToken ct)
        {
            await using var session = await c.ServeAsync(uffd, 0, ct).ConfigureAwait(false);
            var batch = new List<Resolution>();
            await foreach (var first in session.Messages.ReadAllAsync(ct).ConfigureAwait(false))
            {
                batch.Clear();
                var msgs = first;
                do
                {
                    foreach (var m in msgs)
                    {
                        if (m.Pagefault is { } pf)
                            batch.Add(ServeSession.Unprotect(pf.Address & ~(Page - 1)));
                    }
                }
                while (batch.Count < FaultHandlerLoop.MaxResolutions && session.Messages.TryRead(out msgs));
                if (batch.Count == 0)
                    continue;
                await session.ResolveAsync(batch, ct).ConfigureAwait(false);
                Interlocked.Add(ref _handled, batch.Count);
                Interlocked.Increment(ref _batches);
            }
        }
    }

    public static double Percentile(double[] sorted, double p) => sorted[Math.Clamp((int)Math.Ceiling(p * sorted.Length) - 1, 0, sorted.Length - 1)];
}
