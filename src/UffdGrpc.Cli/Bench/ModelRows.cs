using System.Diagnostics;
using UffdGrpc.Mm;

namespace UffdGrpc.Cli.Bench;

/// <summary>
/// The in-process model doing what <see cref="KernelProbe"/> does to the host kernel, with
/// the same sizes (a populated 1 GiB range of 4 KiB pages, 1 GiB of THPs, 4,096 dirty pages
/// in 1 GiB), so each figure sits beside the kernel's; and the model's memory figures.
/// </summary>
internal static class ModelRows
{
    private const ulong Gib = 1UL << 30;
    private const ulong Pg = Kernel.PageSize;
    private const ulong PagesPerGib = Gib / Pg;
    private const ulong A = 0x7e00_0000_0000;

    private sealed record Machine(Kernel K, Mm.Mm Mm, SimThread T);

    private static Machine NewMachine()
    {
        var k = new Kernel(KernelProfile.V6_18, new MachineConfig { MemoryBytes = 8 * Gib });
        var mm = k.CreateMm();
        return new Machine(k, mm, k.CreateThread(mm));
    }

    private static void Run(Machine m, SyscallOp op)
    {
        m.K.Start(m.T, op);
        if (!op.IsCompleted)
            throw new InvalidOperationException($"{op.GetType().Name} did not complete");
    }

    /// <summary>mmap + MADV_(NO)HUGEPAGE + MADV_POPULATE_WRITE, as the probe does.</summary>
    private static void MapPopulated(Machine m, ulong a, ulong len, bool thp)
    {
        Check(m.Mm.Mmap(a, len, Prot.Read | Prot.Write, false, null, 0), "mmap");
        Run(m, MadviseOp.Create(a, len, thp ? Madv.Hugepage : Madv.Nohugepage));
        Run(m, MadviseOp.Create(a, len, Madv.PopulateWrite));
    }

    private static UserfaultfdCtx Uffd(Machine m, UffdFeatures features, ulong a, ulong len)
    {
        Check(m.K.Userfaultfd(m.Mm, Uapi.ONonblock, out var ctx), "userfaultfd");
        Check(ctx!.Api(Uapi.UffdApi, (ulong)features, out _, out _), "UFFDIO_API");
        Check(ctx.Register(a, len, Uapi.RegisterModeWp, out _), "UFFDIO_REGISTER");
        return ctx;
    }

    /// <summary>Seconds of warm-up per operation before its timed rounds (tiered JIT reaches its optimized code).</summary>
    public const double WarmupSeconds = 0.5;

    private static double Timed(Action a)
    {
        var s = Stopwatch.GetTimestamp();
        a();
        return Stopwatch.GetElapsedTime(s).TotalNanoseconds;
    }

    private static void Warm(Action a)
    {
        var w = Stopwatch.StartNew();
        while (w.Elapsed.TotalSeconds < WarmupSeconds)
            a();
    }

    /// <summary>Figures keyed like <see cref="KernelProbe.Measure"/>'s, plus the managed bytes allocated per PTE visited.</summary>
    public static Dictionary<string, double> Measure(int rounds)
    {
        var r = new Dictionary<string, double>();
        {
            var m = NewMachine();
            MapPopulated(m, A, Gib, false);
            var ctx = Uffd(m, UffdFeatures.None, A, Gib);
            Warm(() =>
            {
                ctx.Writeprotect(A, Gib, Uapi.WriteprotectModeWp);
                ctx.Writeprotect(A, Gib, 0);
            });
            var prot = new double[rounds];
            var unprot = new double[rounds];
            var before = GC.GetAllocatedBytesForCurrentThread();
            for (var i = 0; i < rounds; i++)
            {
                prot[i] = Timed(() => ctx.Writeprotect(A, Gib, Uapi.WriteprotectModeWp)) / PagesPerGib;
                unprot[i] = Timed(() => ctx.Writeprotect(A, Gib, 0)) / PagesPerGib;
            }
            r["alloc.wp"] = (double)(GC.GetAllocatedBytesForCurrentThread() - before) / (2UL * (ulong)rounds * PagesPerGib);
            r["wp.protect"] = Median(prot);
            r["wp.unprotect"] = Median(unprot);
            ctx.Release();
            Warm(() =>
            {
                m.Mm.Mprotect(A, Gib, Prot.Read);
                m.Mm.Mprotect(A, Gib, Prot.Read | Prot.Write);
            });
            var ro = new double[rounds];
            var rw = new double[rounds];
            for (var i = 0; i < rounds; i++)
            {
                ro[i] = Timed(() => Check(m.Mm.Mprotect(A, Gib, Prot.Read), "mprotect")) / PagesPerGib;
                rw[i] = Timed(() => Check(m.Mm.Mprotect(A, Gib, Prot.Read | Prot.Write), "mprotect")) / PagesPerGib;
            }
            r["mprotect.ro"] = Median(ro);
            r["mprotect.rw"] = Median(rw);
        }
        {
            var m = NewMachine();
            MapPopulated(m, A, Gib, true);
            if (!m.Mm.PageTable.HugePmdOf(A).TransHuge)
                throw new InvalidOperationException("the model did not back the range with THPs");
            var ctx = Uffd(m, UffdFeatures.None, A, Gib);
            Warm(() =>
            {
                ctx.Writeprotect(A, Gib, Uapi.WriteprotectModeWp);
                ctx.Writeprotect(A, Gib, 0);
            });
            var prot = new double[rounds];
            for (var i = 0; i < rounds; i++)
            {
                prot[i] = Timed(() => ctx.Writeprotect(A, Gib, Uapi.WriteprotectModeWp)) / (Gib / Kernel.PmdSize);
                ctx.Writeprotect(A, Gib, 0);
            }
            r["thp.protect"] = Median(prot);
        }
        MeasureScan(r, rounds);
        r["rt.one"] = RoundTripP50(out var p99);
        r["rt.one.p99"] = p99;
        return r;
    }

    private static void MeasureScan(Dictionary<string, double> r, int rounds)
    {
        var m = NewMachine();
        MapPopulated(m, A, Gib, false);
        var ctx = Uffd(m, UffdFeatures.WpAsync | UffdFeatures.WpUnpopulated, A, Gib);
        ctx.Writeprotect(A, Gib, Uapi.WriteprotectModeWp);
        var arg = new PmScanArg
        {
            Flags = Uapi.PmScanWpMatching | Uapi.PmScanCheckWpasync,
            Start = A,
            End = A + Gib,
            VecLen = 8192,
            CategoryMask = Uapi.PageIsWritten,
            ReturnMask = Uapi.PageIsWritten,
        };
        void Dirty(ulong stride)
        {
            if (stride == 1)
            {
                Run(m, new AccessOp(A, true, 1, (int)PagesPerGib, AccessOrigin.User));
                return;
            }
            for (var p = 0UL; p < PagesPerGib; p += stride)
                Run(m, new AccessOp(A + (p * Pg), true, 1, 1, AccessOrigin.User));
        }
        void Scan()
        {
            if (m.Mm.PagemapScan(arg).Errno != Errno.OK)
                throw new InvalidOperationException("PAGEMAP_SCAN failed");
        }
        var warm = Stopwatch.StartNew();
        while (warm.Elapsed.TotalSeconds < WarmupSeconds)
        {
            Dirty(PagesPerGib / 4096);
            Scan();
        }
        var full = new double[rounds];
        var sparse = new double[rounds];
        for (var i = 0; i < rounds; i++)
        {
            Dirty(1);
            full[i] = Timed(Scan) / PagesPerGib;
            Dirty(PagesPerGib / 4096);
            sparse[i] = Timed(Scan) / PagesPerGib;
        }
        r["scan.full"] = Median(full);
        r["scan.sparse"] = Median(sparse);
    }

    /// <summary>uffd-wp round trip without a transport: the write blocks, the message is read, un-protect wakes it, the write completes. p50 (and p99) in µs.</summary>
    private static double RoundTripP50(out double p99)
    {
        var m = NewMachine();
        const int trips = 20000;
        var b = A;
        Check(m.Mm.Mmap(b, 2 * Pg, Prot.Read | Prot.Write, false, null, 0), "mmap");
        Run(m, new AccessOp(b, true, 1, 1, AccessOrigin.User));
        var ctx = Uffd(m, UffdFeatures.None, b, 2 * Pg);
        var lat = new double[trips];
        var w = Stopwatch.StartNew();
        for (var i = -trips; i < trips; i++)
        {
            if (i < 0 && w.Elapsed.TotalSeconds > WarmupSeconds)
                i = -1;
            ctx.Writeprotect(b, Pg, Uapi.WriteprotectModeWp);
            var s = Stopwatch.GetTimestamp();
            var op = new AccessOp(b, true, (byte)i, 1, AccessOrigin.User);
            m.K.Start(m.T, op);
            ctx.Read(out var msg);
            ctx.Writeprotect(msg!.Address & ~(Pg - 1), Pg, 0);
            if (!op.IsCompleted)
                throw new InvalidOperationException("write did not complete");
            if (i >= 0)
                lat[i] = Stopwatch.GetElapsedTime(s).TotalMicroseconds;
        }
        Array.Sort(lat);
        p99 = lat[(trips * 99 / 100) - 1];
        return lat[trips / 2];
    }

    private static double Median(double[] xs)
    {
        var c = (double[])xs.Clone();
        Array.Sort(c);
        return c[c.Length / 2];
    }

    internal static void Check(Errno e, string what)
    {
        if (e != Errno.OK)
            throw new InvalidOperationException($"{what}: {e}");
    }
}

/// <summary>The fault path's throughput without a transport: threads faulting on write-protected pages, a handler loop reading and un-protecting in batches.</summary>
internal static class ModelThroughput
{
    private const ulong A = 0x7e00_0000_0000;
    private const ulong Pg = Kernel.PageSize;

    /// <summary>Warms the JIT for <see cref="Measure"/> as the other in-process rows are warmed: small runs for <see cref="ModelRows.WarmupSeconds"/> (one run of 4,096 faults left most of the path in tier 0).</summary>
    public static void Warm()
    {
        var w = Stopwatch.StartNew();
        while (w.Elapsed.TotalSeconds < ModelRows.WarmupSeconds)
            Measure(64, 64, 64);
    }

    /// <summary>Resolved faults per second with <paramref name="threads"/> threads each touching <paramref name="perThread"/> protected pages, resolved in batches of up to <paramref name="batch"/>.</summary>
    public static double Measure(int threads, int perThread, int batch)
    {
        var k = new Kernel(KernelProfile.V6_18, new MachineConfig { MemoryBytes = 8UL << 30 });
        var mm = k.CreateMm();
        var len = (ulong)threads * (ulong)perThread * Pg;
        ModelRows.Check(mm.Mmap(A, len, Prot.Read | Prot.Write, false, null, 0, populate: true), "mmap");
        ModelRows.Check(k.Userfaultfd(mm, Uapi.ONonblock, out var ctx), "userfaultfd");
        ModelRows.Check(ctx!.Api(Uapi.UffdApi, 0, out _, out _), "UFFDIO_API");
        ModelRows.Check(ctx.Register(A, len, Uapi.RegisterModeWp, out _), "UFFDIO_REGISTER");
        ModelRows.Check(ctx.Writeprotect(A, len, Uapi.WriteprotectModeWp), "UFFDIO_WRITEPROTECT");
        var ops = new List<AccessOp>();
        for (var t = 0; t < threads; t++)
        {
            var op = new AccessOp(A + ((ulong)t * (ulong)perThread * Pg), true, 0, perThread, AccessOrigin.User);
            ops.Add(op);
            k.Start(k.CreateThread(mm), op);
        }
        var addrs = new ulong[batch];
        long resolved = 0;
        var sw = System.Diagnostics.Stopwatch.StartNew();
        while (true)
        {
            var n = 0;
            lock (k.Lock)
            {
                while (n < batch && ctx.Read(out var msg) == Errno.OK)
                    addrs[n++] = msg!.Address & ~(Pg - 1);
            }
            if (n == 0)
                break;
            k.Locked(() =>
            {
                for (var i = 0; i < n; i++)
                    ctx.Writeprotect(addrs[i], Pg, 0);
            });
            resolved += n;
        }
        var secs = sw.Elapsed.TotalSeconds;
        if (ops.Any(o => !o.IsCompleted))
            throw new InvalidOperationException("an access did not complete");
        return resolved / secs;
    }
}
