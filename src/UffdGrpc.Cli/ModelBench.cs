using System.Diagnostics;
using System.Globalization;
using UffdGrpc.Mm;
using UffdGrpc.Scenarios;

namespace UffdGrpc.Cli;

/// <summary>
/// In-process figures for the model's hot paths: change_protection per PTE (and its
/// managed allocations), the anonymous write fault, a uffd-wp fault round trip with no
/// transport, and whole-scenario replay. Ratios compare against a raw pass over the same
/// number of 64-bit values, which is the floor for touching every PTE.
/// </summary>
public static class ModelBench
{
    private const ulong Pg = Kernel.PageSize;

    public static async Task<int> RunAsync(TextWriter o, int sizeMiB, string? scenarioDir)
    {
        var inv = CultureInfo.InvariantCulture;
        var pages = (ulong)sizeMiB << 20 >> 12;
        var k = new Kernel();
        var mm = k.CreateMm();
        var t = k.CreateThread(mm);
        const ulong a = 0x7e00_0000_0000;
        Check(mm.Mmap(a, pages * Pg, Prot.Read | Prot.Write, false, null, 0, populate: true));
        var vma = mm.VmaLookup(a)!;

        double protectNs, resolveNs, baseNs;
        long allocated;
        const int rounds = 40;
        var raw = new ulong[pages];
        lock (k.Lock)
        {
            // Warm up until tiered compilation has promoted the hot paths.
            var warm = Stopwatch.StartNew();
            while (warm.ElapsedMilliseconds < 500)
            {
                Protect(mm, vma, a, pages, 1);
                RawPass(raw, 1);
            }
            var before = GC.GetAllocatedBytesForCurrentThread();
            protectNs = Protect(mm, vma, a, pages, rounds).Protect;
            resolveNs = Protect(mm, vma, a, pages, rounds).Resolve;
            allocated = GC.GetAllocatedBytesForCurrentThread() - before;
            baseNs = RawPass(raw, rounds);
        }

        // Anonymous write faults on fresh memory.
        var b = a + (pages * Pg) + (2UL << 20);
        const int faults = 20000;
        Check(mm.Mmap(b, faults * Pg, Prot.Read | Prot.Write, false, null, 0));
        var fsw = Stopwatch.StartNew();
        k.Start(t, new AccessOp(b, true, 1, faults, AccessOrigin.User));
        var faultNs = fsw.Elapsed.TotalNanoseconds / faults;

        // uffd-wp round trip without a transport: write blocks, read the message, unprotect, write completes.
        k.Userfaultfd(mm, Uapi.ONonblock, out var ctx);
        ctx!.Api(Uapi.UffdApi, 0, out _, out _);
        ctx.Register(b, faults * Pg, Uapi.RegisterModeWp, out _);
        const int trips = 5000;
        ctx.Writeprotect(b, trips * Pg, Uapi.WriteprotectModeWp);
        var lat = new double[trips];
        for (var i = 0; i < trips; i++)
        {
            var s = Stopwatch.GetTimestamp();
            var op = new AccessOp(b + ((ulong)i * Pg), true, 2, 1, AccessOrigin.User);
            k.Start(t, op);
            ctx.Read(out var msg);
            ctx.Writeprotect(msg!.Address, Pg, 0);
            if (!op.IsCompleted)
                throw new InvalidOperationException("write did not complete");
            lat[i] = Stopwatch.GetElapsedTime(s).TotalMicroseconds;
        }
        Array.Sort(lat);

        o.WriteLine($"model benchmark ({sizeMiB} MiB populated = {pages} PTEs)");
        o.WriteLine(string.Format(inv, "  change_protection UFFD_WP          {0,8:F2} ns/PTE   ratio to raw pass {1,6:F1}x", protectNs, protectNs / baseNs));
        o.WriteLine(string.Format(inv, "  change_protection UFFD_WP_RESOLVE  {0,8:F2} ns/PTE   ratio to raw pass {1,6:F1}x", resolveNs, resolveNs / baseNs));
        o.WriteLine(string.Format(inv, "  raw pass over {0} values          {1,8:F2} ns/value", pages, baseNs));
        o.WriteLine(string.Format(inv, "  managed allocation in {2} passes   {0,8} bytes    ({1:F4} bytes/PTE)", allocated, (double)allocated / (4 * rounds * pages), 4 * rounds));
        o.WriteLine(string.Format(inv, "  anonymous write fault              {0,8:F0} ns/fault", faultNs));
        o.WriteLine(string.Format(inv, "  uffd-wp fault round trip in-process  p50 {0:F2} us  p99 {1:F2} us", lat[trips / 2], lat[trips * 99 / 100]));

        if (scenarioDir is not null && Directory.Exists(scenarioDir))
        {
            var files = Directory.GetFiles(scenarioDir, "*.scn");
            var ssw = Stopwatch.StartNew();
            foreach (var f in files)
            {
                await using var backend = new InProcessBackend();
                using var reader = new StreamReader(f);
                await new ScenarioInterpreter(backend, TextWriter.Null).RunAsync(reader).ConfigureAwait(false);
            }
            o.WriteLine(string.Format(inv, "  scenario replay                    {0,8:F2} ms/scenario ({1} scenarios)", ssw.Elapsed.TotalMilliseconds / files.Length, files.Length));
        }
        return 0;
    }

    private static (double Protect, double Resolve) Protect(Mm.Mm mm, Vma vma, ulong a, ulong pages, int rounds)
    {
        long p = 0, r = 0;
        for (var i = 0; i < rounds; i++)
        {
            var s = Stopwatch.GetTimestamp();
            mm.ChangeProtection(vma, a, a + (pages * Pg), CpFlags.UffdWp);
            var m = Stopwatch.GetTimestamp();
            mm.ChangeProtection(vma, a, a + (pages * Pg), CpFlags.UffdWpResolve | CpFlags.TryChangeWritable);
            var e = Stopwatch.GetTimestamp();
            p += m - s;
            r += e - m;
        }
        var toNs = 1e9 / Stopwatch.Frequency / rounds / pages;
        return (p * toNs, r * toNs);
    }

    private static double RawPass(ulong[] raw, int rounds)
    {
        var s = Stopwatch.GetTimestamp();
        for (var r = 0; r < rounds; r++)
        {
            for (var i = 0; i < raw.Length; i++)
                raw[i] = (raw[i] & ~PteBits.PageRw) | PteBits.PageUffdWp;
        }
        return Stopwatch.GetElapsedTime(s).TotalNanoseconds / rounds / raw.Length;
    }

    private static void Check(Errno e)
    {
        if (e != Errno.OK)
            throw new InvalidOperationException(e.ToString());
    }
}
