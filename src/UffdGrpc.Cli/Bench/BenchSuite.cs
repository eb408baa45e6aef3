using System.Diagnostics;
using System.Globalization;

namespace UffdGrpc.Cli.Bench;

/// <summary>
/// <c>bench</c>: one fixed, short run that prints one table — operation, figure, anchor,
/// ratio (figure ÷ anchor) and the target. Anchors: the host kernel measured live where it
/// allows (root, userfaultfd), else the reference machine's figures (Linux 6.18, 2 vCPUs);
/// for RPC rows the transport floor measured in the same run (a bare gRPC server of the same
/// RPC shapes, its own process, like the product server); for scaling rows the same
/// layout's one-thread figure; for memory rows what the kernel spends (a PTE) or the target.
/// </summary>
internal static class BenchSuite
{
    /// <summary>The reference machine's kernel figures (issue 12), used when the host cannot be measured.</summary>
    private static readonly Dictionary<string, double> s_reference = new()
    {
        ["wp.protect"] = 59.8,
        ["wp.unprotect"] = 68.4,
        ["thp.protect"] = 102,
        ["mprotect.ro"] = 59.3,
        ["mprotect.rw"] = 68.6,
        ["scan.full"] = 31.7,
        ["scan.sparse"] = 2.48,
        ["rt.one"] = 6.1,
        ["rt.cross"] = 66,
    };

    /// <summary>Untimed round trips per shape and seconds of untimed throughput per layout, on each server, before anything over the wire is timed.</summary>
    private const int WarmupTrips = 2000;
    // Round trips alternate between the product and the floor in blocks of this many.
    private const int RoundTripBlock = 100;
    private const double WarmupSeconds = 1.5;
    // Pairs of batched runs (floor, product); the row prints the median of each.
    private const int BatchRounds = 3;
    // Issue 12's batched target, 500k faults/s against its reference floor's 0.95 M/s, as the
    // ratio to the floor it binds (the floor measured in the same run stands in for 0.95 M/s).
    private const string BatchTarget = ">= 0.53 (500k/s at a 950k/s floor)";

    /// <summary>The parts of the run, in order (<c>--only</c> picks some).</summary>
    public static readonly string[] Sections = ["kernel", "roundtrip", "batch", "scaling", "memory"];

    private sealed record Row(string Operation, double Figure, string Unit, double Anchor, string AnchorWhat, string Target);

    public static async Task<int> RunAsync(TextWriter o, string? server, bool quick, string? only, CancellationToken ct)
    {
        var parts = only?.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries) ?? Sections;
        if (parts.Except(Sections).FirstOrDefault() is { } bad)
        {
            await Console.Error.WriteLineAsync($"bench: --only: unknown part {bad} (use {string.Join(", ", Sections)})").ConfigureAwait(false);
            return 1;
        }
        bool Want(string part) => parts.Contains(part);
        var inv = CultureInfo.InvariantCulture;
        var clock = Stopwatch.StartNew();
        var rows = new List<(string Section, Row Row)>();
        var rounds = quick ? 3 : 9;

        // 1. The kernel, live where the host allows it, and the model beside it.
        var why = KernelProbe.Unavailable();
        var kernel = s_reference;
        var kernelWhat = "kernel ref";
        if (Want("kernel"))
        {
            if (why is null)
            {
                kernel = KernelProbe.Measure(rounds);
                kernelWhat = "kernel live";
            }
            var model = ModelRows.Measure(rounds);
            const string K = "model in-process vs the kernel (1 GiB populated, 4 KiB pages unless noted)";
            void Kr(string op, string key, string unit, string target)
            {
                if (kernel.TryGetValue(key, out var k))
                    rows.Add((K, new Row(op, model[key], unit, k, kernelWhat + (kernel == s_reference ? "" : Ref(key, unit)), target)));
                else
                    rows.Add((K, new Row(op, model[key], unit, s_reference.GetValueOrDefault(key, double.NaN), "kernel ref", target)));
            }
            Kr("UFFDIO_WRITEPROTECT protect", "wp.protect", "ns/page", "<= 0.5");
            Kr("UFFDIO_WRITEPROTECT un-protect", "wp.unprotect", "ns/page", "<= 0.5");
            Kr("UFFDIO_WRITEPROTECT protect, THP", "thp.protect", "ns/PMD", "<= 1");
            Kr("mprotect(PROT_READ)", "mprotect.ro", "ns/page", "<= 0.5");
            Kr("mprotect back to PROT_READ|WRITE", "mprotect.rw", "ns/page", "<= 0.5");
            Kr("PAGEMAP_SCAN WP_MATCHING, all pages written", "scan.full", "ns/page", "");
            Kr("PAGEMAP_SCAN collect+re-arm 4,096 dirty", "scan.sparse", "ns/page", "");
            Kr("WP fault round trip p50, one CPU (no transport)", "rt.one", "us", "");
            Kr("WP fault round trip p99, one CPU (no transport)", "rt.one.p99", "us", "");
            rows.Add((K, new Row("managed bytes allocated per PTE visited", model["alloc.wp"], "B", 0, "none", "0")));
        }

        // 2. The transport: the product beside the floor, interleaved, in one run.
        if (Want("roundtrip") || Want("batch") || Want("scaling"))
        {
            // This process is the client of every transport row: what the model rows left on
            // its heap (1 GiB address spaces) is collected now, not by a background collection
            // that descheduled the client in the middle of whichever server's block (the
            // Serve p99 read 1.9x the floor in a full run, never above 1.12x without the model rows).
            GC.Collect(2, GCCollectionMode.Forced, blocking: true, compacting: true);
            GC.WaitForPendingFinalizers();
            GC.Collect(2, GCCollectionMode.Forced, blocking: true, compacting: true);
            var product = server is null ? await ChildServer.StartAsync("product", ct).ConfigureAwait(false) : null;
            var floor = await ChildServer.StartAsync("floor", ct).ConfigureAwait(false);
            try
            {
                var url = server ?? product!.Url;
                var secs = quick ? 1.0 : 2.0;
                // Warm-up, untimed, on both servers until tiered JIT has compiled the path (it
                // otherwise takes a CPU of the two mid-run): each section's own shapes, right
                // before its rows. The round trips come first, warmed by round trips only: after
                // the throughput runs' hundreds of thousands of faults the product's unary round
                // trips cost more CPU for a while (its row read 1.3-1.9x the floor's CPU, against
                // 1.1-1.5x warmed by round trips alone), which is a row about heavy load, not
                // about one fault.
                if (Want("roundtrip"))
                {
                    foreach (var u in new[] { floor.Url, url })
                    {
                        await Transport.RoundTripAsync(u, false, 1, WarmupTrips, ct).ConfigureAwait(false);
                        await Transport.RoundTripAsync(u, true, 1, WarmupTrips, ct).ConfigureAwait(false);
                    }
                    // 6000, not 3000: a p99 of 3000 trips is their 30th slowest, and one stall of the shared
                    // machine landing in one server's block moved it by up to 2x (the Serve p99 read
                    // 0.67-1.90x over eleven runs with 3000, two above 1.25; 0.62-1.10x over four with 6000).
                    var (iters, warm) = quick ? (500, 500) : (6000, 1000);
                    var T = string.Create(inv, $"fault round trip over loopback (WP write -> handler -> un-protect -> access returns), one thread; {iters} timed trips each, product and floor alternating in blocks of {RoundTripBlock}");
                    foreach (var (serve, label) in new[] { (false, "ReadEvents + unary WRITEPROTECT"), (true, "Serve, one fault at a time") })
                    {
                        await ChildServer.SettleAsync(ct, product, floor).ConfigureAwait(false);
                        var (pc0, fc0) = (product?.CpuSeconds ?? double.NaN, floor.CpuSeconds);
                        var (p, f) = await Transport.InterleavedRoundTripsAsync(url, floor.Url, serve, iters, warm, RoundTripBlock, ct).ConfigureAwait(false);
                        var (pc, fc) = (((product?.CpuSeconds ?? double.NaN) - pc0) / (iters + warm), (floor.CpuSeconds - fc0) / (iters + warm));
                        rows.Add((T, new Row($"{label} p50", Transport.Percentile(p, 0.5), "us", Transport.Percentile(f, 0.5), "floor", "<= 1.25")));
                        rows.Add((T, new Row($"{label} p99", Transport.Percentile(p, 0.99), "us", Transport.Percentile(f, 0.99), "floor", "<= 1.25")));
                        if (product is not null)
                            rows.Add((T, new Row($"{label}: server CPU per round trip, all threads (the untimed re-protect call included)", pc * 1e6, "us", fc * 1e6, "floor", "")));
                    }
                    if (why is null)
                    {
                        var (x50, x99) = KernelProbe.CrossRoundTrip();
                        rows.Add((T, new Row("(the kernel's, handler on the other vCPU, p50)", x50, "us", s_reference["rt.cross"], "kernel ref", "")));
                        rows.Add((T, new Row("(the kernel's, handler on the other vCPU, p99)", x99, "us", double.NaN, "none", "")));
                    }
                }
                if (Want("batch") || Want("scaling"))
                {
                    foreach (var u in new[] { floor.Url, url })
                    {
                        await Transport.ThroughputAsync(u, 64, 1, 1, 65_536, WarmupSeconds, ct).ConfigureAwait(false);
                        await Transport.ThroughputAsync(u, 256, 4, 8, 65_536, WarmupSeconds, ct).ConfigureAwait(false);
                    }
                }
                if (Want("batch"))
                {
                    const string B = "batched resolution: 64 threads faulting server-side (StartOp touches writing 0), one Serve handler, batches of <= 64";
                    var (pb, fb) = await Transport.InterleavedThroughputAsync(url, product is null ? null : () => product.CpuSeconds, floor.Url, () => floor.CpuSeconds, () => ChildServer.SettleAsync(ct, product, floor), BatchRounds, 262_144, secs, ct).ConfigureAwait(false);
                    rows.Add((B, new Row(string.Create(inv, $"resolved faults/s, median of {BatchRounds} runs alternating with the floor's (faults per request: {pb.MeanBatch:F1}; floor {fb.MeanBatch:F1})"), pb.Rate, "1/s", fb.Rate, "floor", BatchTarget)));
                    if (product is not null)
                        rows.Add((B, new Row("server CPU per resolved fault, all threads (in the same runs)", pb.ServerCpuPerFault * 1e6, "us", fb.ServerCpuPerFault * 1e6, "floor", "")));
                    ModelThroughput.Warm();
                    rows.Add((B, new Row("the same in-process (no transport)", ModelThroughput.Measure(64, 1024, 64), "1/s", fb.Rate, "floor", "")));
                }
                if (Want("scaling"))
                {
                    const string S = "scaling: resolved faults/s, threads faulting server-side (as above); anchor = the same layout with 1 thread";
                    foreach (var (streams, mms, label) in new[] { (1, 1, "1 uffd, 1 Serve stream"), (4, 1, "1 uffd, 4 Serve streams"), (1, 8, "8 mms, a uffd + stream each") })
                    {
                        double one = 0;
                        foreach (var threads in new[] { 1, 8, 64, 256 })
                        {
                            await ChildServer.SettleAsync(ct, product).ConfigureAwait(false);
                            var (rate, perRequest, _) = await Transport.ThroughputAsync(url, threads, streams, mms, 65_536, secs * 0.75, ct).ConfigureAwait(false);
                            if (threads == 1)
                                one = rate;
                            rows.Add((S, new Row(string.Create(inv, $"{label}, {threads} thread{(threads == 1 ? "" : "s")} ({perRequest:F1} per request)"), rate, "1/s", one, "1 thread", threads == 256 ? ">= 1" : "")));
                        }
                    }
                }
            }
            finally
            {
                if (product is not null)
                    await product.DisposeAsync().ConfigureAwait(false);
                await floor.DisposeAsync().ConfigureAwait(false);
            }
        }

        // 3. Memory.
        if (Want("memory"))
        {
            var mem = MemoryRows.Measure();
            const string M = "memory: managed heap of the model (what a server holds), per page; 128 Ki pages in runs of 512, 4 GiB apart, in a 1 TiB mapping, unless dense";
            rows.Add((M, new Row("metadata per resident page (beside 4 KiB)", mem["mem.resident"], "B", 64, "target", "<= 1")));
            rows.Add((M, new Row("  of which the frame, page tables aside", mem["mem.frame"], "B", 64, "kernel struct page", "<= 1")));
            rows.Add((M, new Row("  dense: 128 Ki consecutive pages in 1 GiB", mem["mem.dense"], "B", 64, "target", "<= 1")));
            rows.Add((M, new Row("read of an untouched page (zero page)", mem["mem.zero"], "B", 16, "kernel PTE + PMD tables", "<= 1")));
            rows.Add((M, new Row("sparse 1 TiB mapping, never touched", mem["mem.sparse"], "B", 0, "none", "0")));
            rows.Add((M, new Row("fork of 1 GiB of written anon pages, at fork", mem["mem.fork"], "B", 8, "kernel PTE", "<= 1")));
            rows.Add((M, new Row("  then each page the child writes", mem["mem.fork.touched"], "B", 4096 + 64, "4 KiB + 64", "<= 1")));
        }

        o.WriteLine(string.Create(inv, $"uffdgrpc bench: {Environment.ProcessorCount} CPUs, {System.Runtime.InteropServices.RuntimeInformation.OSDescription}, .NET {Environment.Version}"));
        o.WriteLine(why is null
            ? "kernel anchors: measured live on this host (root, userfaultfd) with the same operations and sizes; ref = the reference machine (issue 12)"
            : $"kernel anchors: the reference machine's figures (Linux 6.18, 2 vCPUs): this host cannot be measured ({why})");
        o.WriteLine(string.Create(inv, $"JIT warm-up: {ModelRows.WarmupSeconds:F1} s per in-process operation before timing; servers run with DOTNET_TC_CallCountingDelayMs=0 and serve {WarmupTrips} untimed round trips of each shape before the round-trip rows and {WarmupSeconds:F1} s of untimed faults in two layouts before the throughput rows; each round-trip row then warms up with {(quick ? 500 : 1000)} more; every measured row starts once the servers are quiet (at most 10 ms of CPU in 200 ms, or {ChildServer.SettleLimit.TotalSeconds:F0} s); throughput counts after the first 10 % of faults (or 0.3 s)"));
        o.WriteLine(server is null ? "servers: the product (UffdGrpc.Server) and the floor (bench-floor), each its own process on a loopback port this run picked" : $"servers: the product at {server}, the floor (bench-floor) its own process on a loopback port this run picked");
        string? section = null;
        foreach (var (sec, r) in rows)
        {
            if (sec != section)
            {
                section = sec;
                o.WriteLine();
                o.WriteLine($"### {sec}");
                o.WriteLine("| operation | figure | anchor | ratio | target |");
                o.WriteLine("|---|---:|---:|---:|---:|");
            }
            var ratio = r.Anchor == 0 || double.IsNaN(r.Anchor) ? "-" : (r.Figure / r.Anchor).ToString("F2", inv);
            var anchor = double.IsNaN(r.Anchor) ? "-" : $"{Fmt(r.Anchor, r.Unit)} ({r.AnchorWhat})";
            o.WriteLine($"| {r.Operation} | {Fmt(r.Figure, r.Unit)} | {anchor} | {ratio} | {r.Target} |");
        }
        o.WriteLine();
        o.WriteLine(string.Create(inv, $"bench took {clock.Elapsed.TotalSeconds:F0} s"));
        return 0;
    }

    /// <summary>The reference figure beside a live one, so a reader sees how this host compares with the reference machine.</summary>
    private static string Ref(string key, string unit) => s_reference.TryGetValue(key, out var v) ? "; ref " + Fmt(v, unit) : "";

    private static string Fmt(double v, string unit)
    {
        var inv = CultureInfo.InvariantCulture;
        if (double.IsNaN(v))
            return "-";
        if (Math.Abs(v) < 0.05)
            v = 0; // a heap delta a few bytes under zero is noise, not a negative cost
        return unit switch
        {
            "1/s" => v >= 10_000 ? (v / 1000).ToString("F1", inv) + "k/s" : v.ToString("F0", inv) + "/s",
            "us" => v.ToString(v < 100 ? "F2" : "F0", inv) + " us",
            "B" => v.ToString("F1", inv) + " B",
            _ => v.ToString("F2", inv) + " " + unit,
        };
    }
}
