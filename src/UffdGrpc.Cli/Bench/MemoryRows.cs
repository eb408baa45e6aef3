using UffdGrpc.Mm;

namespace UffdGrpc.Cli.Bench;

/// <summary>
/// What the model's state costs in managed memory (live heap after a full collection, the
/// same objects a server holds per machine): per resident page beside its 4 KiB of contents,
/// in a sparse layout (runs of one PTE table each, 4 GiB apart, so each run pays its own PMD
/// table too) and a dense one (consecutive pages, where the upper tables amortise away); per
/// page read from the zero page; per page of a sparse 1 TiB mapping; and a 1 GiB fork before
/// and after the child writes some of it.
/// </summary>
internal static class MemoryRows
{
    private const ulong Pg = Kernel.PageSize;
    private const ulong A = 0x7000_0000_0000;
    private const ulong Tib = 1UL << 40;
    private const ulong Gib = 1UL << 30;
    /// <summary>Pages written in the 1 TiB mapping: 128 Ki, in runs of 512 (one PTE table each) spread over the mapping.</summary>
    private const int Resident = 128 * 1024;
    private const int Run = 512;

    private static long Heap()
    {
        GC.Collect(2, GCCollectionMode.Forced, blocking: true, compacting: true);
        GC.WaitForPendingFinalizers();
        GC.Collect(2, GCCollectionMode.Forced, blocking: true, compacting: true);
        return GC.GetTotalMemory(false);
    }

    private static void Run1(Kernel k, SimThread t, SyscallOp op)
    {
        k.Start(t, op);
        if (!op.IsCompleted)
            throw new InvalidOperationException($"{op.GetType().Name} did not complete");
    }

    public static Dictionary<string, double> Measure()
    {
        var r = new Dictionary<string, double>();
        var k = new Kernel(KernelProfile.V6_18, new MachineConfig { MemoryBytes = 8 * Gib });
        var mm = k.CreateMm();
        var t = k.CreateThread(mm);
        var h0 = Heap();
        ModelRows.Check(mm.Mmap(A, Tib, Prot.Read | Prot.Write, false, null, 0), "mmap 1 TiB");
        var h1 = Heap();
        r["mem.sparse"] = (double)(h1 - h0) / (Tib / Pg);

        // 128 Ki pages read (the zero page), in runs of 512 spread over the mapping.
        var stride = Tib / (Resident / Run);
        for (var i = 0UL; i < Resident / Run; i++)
            Run1(k, t, new AccessOp(A + (i * stride), false, 0, Run, AccessOrigin.User));
        var h2 = Heap();
        r["mem.zero"] = (double)(h2 - h1) / Resident;

        // The same pages written (anon pages with contents): what each costs beyond 4 KiB.
        for (var i = 0UL; i < Resident / Run; i++)
            Run1(k, t, new AccessOp(A + (i * stride), true, 0x5a, Run, AccessOrigin.User));
        var h3 = Heap();
        r["mem.resident"] = ((double)(h3 - h1) / Resident) - Pg;
        // The zero-page reads already built the page tables: what the writes added is the frames alone.
        r["mem.frame"] = ((double)(h3 - h2) / Resident) - Pg;
        GC.KeepAlive(k);

        // The same number of pages written one after the other in a 1 GiB mapping.
        var kd = new Kernel(KernelProfile.V6_18, new MachineConfig { MemoryBytes = 8 * Gib });
        var mmd = kd.CreateMm();
        var td = kd.CreateThread(mmd);
        ModelRows.Check(mmd.Mmap(A, Gib, Prot.Read | Prot.Write, false, null, 0), "mmap 1 GiB");
        var d0 = Heap();
        for (var i = 0UL; i < Resident / Run; i++)
            Run1(kd, td, new AccessOp(A + (i * Run * Pg), true, 0x5a, Run, AccessOrigin.User));
        var d1 = Heap();
        r["mem.dense"] = ((double)(d1 - d0) / Resident) - Pg;
        GC.KeepAlive(kd);

        // A 1 GiB fork: the parent wrote every page (byte 0: anon pages without contents arrays); the child then writes 4,096 of them.
        var k2 = new Kernel(KernelProfile.V6_18, new MachineConfig { MemoryBytes = 8 * Gib });
        var mm2 = k2.CreateMm();
        var t2 = k2.CreateThread(mm2);
        ModelRows.Check(mm2.Mmap(A, Gib, Prot.Read | Prot.Write, false, null, 0), "mmap 1 GiB");
        Run1(k2, t2, new AccessOp(A, true, 0, (int)(Gib / Pg), AccessOrigin.User));
        var f0 = Heap();
        var fork = new ForkOp();
        Run1(k2, t2, fork);
        var f1 = Heap();
        r["mem.fork"] = (double)(f1 - f0) / (Gib / Pg);
        var child = fork.ChildThread!;
        const int touched = 4096;
        for (var p = 0UL; p < touched; p++)
            Run1(k2, child, new AccessOp(A + (p * (Gib / Pg / touched) * Pg), true, 0x22, 1, AccessOrigin.User));
        var f2 = Heap();
        r["mem.fork.touched"] = (double)(f2 - f1) / touched;
        GC.KeepAlive(k2);
        return r;
    }
}
