using UffdGrpc.Mm;

namespace UffdGrpc.Scenarios;

/// <summary>How the dirty tracker collects and re-arms written pages each round.</summary>
public enum DirtyHandler
{
    /// <summary>PAGEMAP_SCAN with PM_SCAN_WP_MATCHING: collect and re-protect in one atomic call (correct).</summary>
    WpMatching,
    /// <summary>PAGEMAP_SCAN to collect, then UFFDIO_WRITEPROTECT of what it reported in a second call (a write in between is lost).</summary>
    TwoCalls,
}

/// <summary>What one seeded run of the dirty-tracking workload found.</summary>
/// <param name="LostWrite">A write that the first scan after it did not report (null: none).</param>
/// <param name="Writes">Page writes the guest made.</param>
/// <param name="Scans">PAGEMAP_SCAN calls the tracker made.</param>
public sealed record DirtyOutcome(string? LostWrite, long Writes, int Scans)
{
    /// <summary>The outcome as the explorer groups it.</summary>
    public string Summary => LostWrite is null ? "every write reported by the first scan after it" : "LOST " + LostWrite;
}

/// <summary>
/// A pre-copy dirty tracker against a guest that keeps writing (QEMU's migration-test guest:
/// every page rewritten in a loop), in-process under a seeded, preemptive schedule: the
/// guest's multi-page writes are preempted page by page and continue at the start of the
/// tracker's later calls, so its writes interleave with the tracker's calls as the seed
/// says. The range is registered WP with WP_ASYNC (the kernel resolves each write and the
/// page reads as written). The check is the property a tracker must keep: each write is
/// reported by the first scan that follows it.
/// </summary>
public static class DirtyTrackingWorkload
{
    private const ulong Base = 0x7e00_0000_0000;
    private const ulong Pg = Kernel.PageSize;

    public static DirtyOutcome Run(ulong seed, DirtyHandler handler, int pages = 8, int generations = 6, int rounds = 48)
    {
        var k = new Kernel();
        k.SetSchedule(seed, preempt: true);
        var mm = k.CreateMm();
        var len = (ulong)pages * Pg;
        Check(mm.Mmap(Base, len, Prot.Read | Prot.Write, shared: false, file: null, offset: 0, populate: true), "mmap");
        Check(k.Userfaultfd(mm, Uapi.ONonblock, out var ctx), "userfaultfd");
        Check(ctx!.Api(Uapi.UffdApi, (ulong)(UffdFeatures.WpAsync | UffdFeatures.WpUnpopulated), out _, out _), "UFFDIO_API");
        Check(ctx.Register(Base, len, Uapi.RegisterModeWp, out _), "UFFDIO_REGISTER");
        Check(ctx.Writeprotect(Base, len, Uapi.WriteprotectModeWp), "UFFDIO_WRITEPROTECT");

        var guest = k.CreateThread(mm);
        var gen = 0;
        AccessOp? op = null;
        var seen = 0;
        var pending = new Dictionary<int, string>();
        long writes = 0;
        var scans = 0;
        string? lost = null;

        // Pages the guest wrote since the last look happened before the call that just returned acted.
        void Observe(string when)
        {
            for (; op is not null && seen < op.Done; seen++)
            {
                writes++;
                pending[seen] = $"page {seen} written (generation {gen}) before {when}";
            }
        }

        // The guest's loop: once a pass over the range completes, the next one starts (its
        // first page is written as it starts, after the call that just returned).
        void Restart()
        {
            while (op is { IsCompleted: true } && gen < generations)
            {
                gen++;
                seen = 0;
                op = new AccessOp(Base, write: true, value: (byte)gen, count: pages, AccessOrigin.User);
                k.Start(guest, op);
                Observe($"scan {scans + 1}");
            }
        }

        void Scan(bool wpMatching, string when)
        {
            scans++;
            var r = mm.PagemapScan(new PmScanArg
            {
                Flags = (ulong)(wpMatching ? Uapi.PmScanWpMatching | Uapi.PmScanCheckWpasync : 0),
                Start = Base,
                End = Base + len,
                VecLen = (ulong)pages,
                CategoryMask = Uapi.PageIsWritten,
                ReturnMask = Uapi.PageIsWritten,
            });
            Check(r.Errno, "PAGEMAP_SCAN");
            Observe(when);
            var reported = new HashSet<int>();
            foreach (var reg in r.Regions)
            {
                for (var a = reg.Start; a < reg.End; a += Pg)
                    reported.Add((int)((a - Base) / Pg));
            }
            foreach (var (page, what) in pending)
            {
                if (!reported.Contains(page))
                {
                    lost ??= $"{what}; scan {scans} did not report it";
                }
            }
            pending.Clear();
            if (!wpMatching)
            {
                foreach (var reg in r.Regions)
                {
                    Check(ctx.Writeprotect(reg.Start, reg.End - reg.Start, Uapi.WriteprotectModeWp), "UFFDIO_WRITEPROTECT");
                    Observe($"the re-protect after scan {scans}");
                }
            }
            Restart();
        }

        gen = 1;
        op = new AccessOp(Base, write: true, value: 1, count: pages, AccessOrigin.User);
        k.Start(guest, op);
        Observe("the first scan");
        for (var round = 0; round < rounds && lost is null; round++)
            Scan(handler == DirtyHandler.WpMatching, $"scan {scans + 1}");
        k.RunPreempted();
        Observe("the final scan");
        Restart();
        k.RunPreempted();
        Observe("the final scan");
        if (lost is null)
            Scan(handler == DirtyHandler.WpMatching, "the final scan");
        return new DirtyOutcome(lost, writes, scans);
    }

    private static void Check(Errno e, string what)
    {
        if (e != Errno.OK)
            throw new InvalidOperationException($"dirty tracking: {what}: {e}");
    }
}
