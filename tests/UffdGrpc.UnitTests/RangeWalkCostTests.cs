using UffdGrpc.Mm;

namespace UffdGrpc.UnitTests;

/// <summary>
/// A range operation costs what the page tables hold, not the length asked: over a 2^46-byte
/// VMA with three pages written far apart, every walk skips the empty PGD and PUD ranges in
/// one step each (walk_pgd_range / walk_pud_range: pgd_none, pud_none), as the kernel does;
/// what is left is the 512 entries of each table that exists.
/// Counted in walk steps (deterministic), not timed: before, each of these took 2^25 PMD
/// steps (~140 ms under the machine lock), and a mremap 2^34 per-page steps.
/// </summary>
public sealed class RangeWalkCostTests
{
    private const ulong Pg = Kernel.PageSize;
    private const ulong Start = 0x1000_0000_0000;
    private const ulong Len = 1UL << 46;
    private const long Bound = 1 << 16;
    private static readonly ulong[] s_pages = Pages(Len);

    private static ulong[] Pages(ulong len) => [Start, Start + (len / 2) + (7 * Pg), Start + len - Pg];

    private static Machine Mapped(ulong len = Len)
    {
        var m = new Machine();
        Assert.Equal(Errno.OK, m.Mm.Mmap(Start, len, Prot.Read | Prot.Write, false, null, 0));
        var s_pages = Pages(len);
        for (var i = 0; i < s_pages.Length; i++)
            Assert.Equal(1, m.Write(s_pages[i], (byte)(0x40 + i)).Done);
        return m;
    }

    private static long Steps(Machine m, Action op, Mm.Mm? mm = null)
    {
        var pt = (mm ?? m.Mm).PageTable;
        var before = pt.WalkSteps;
        op();
        return pt.WalkSteps - before;
    }

    [Fact]
    public void Mprotect_writeprotect_and_dontneed_of_a_huge_sparse_vma_walk_what_is_mapped()
    {
        var m = Mapped();
        Assert.InRange(Steps(m, () => Assert.Equal(Errno.OK, m.Mm.Mprotect(Start, Len, Prot.Read))), 1, Bound);
        Assert.All(s_pages, a => Assert.False(m.PteAt(a).Write));
        Assert.InRange(Steps(m, () => Assert.Equal(Errno.OK, m.Mm.Mprotect(Start, Len, Prot.Read | Prot.Write))), 1, Bound);

        var u = m.Uffd();
        Assert.Equal(Errno.OK, u.Register(Start, Len, Uapi.RegisterModeWp, out _));
        Assert.InRange(Steps(m, () => Assert.Equal(Errno.OK, u.Writeprotect(Start, Len, Uapi.WriteprotectModeWp))), 1, Bound);
        Assert.All(s_pages, a => Assert.True(m.PteAt(a).UffdWp));
        Assert.InRange(Steps(m, () => Assert.Equal(Errno.OK, u.Writeprotect(Start, Len, 0))), 1, Bound);
        Assert.All(s_pages, a => Assert.False(m.PteAt(a).UffdWp));
        Assert.Equal(Errno.OK, u.Unregister(Start, Len));

        Assert.InRange(Steps(m, () => m.K.Start(m.T, new MadviseOp(Start, Len, Madv.Dontneed))), 1, Bound);
        Assert.All(s_pages, a => Assert.True(m.PteAt(a).IsNone));
    }

    [Fact]
    public void Smaps_and_pagemap_scan_of_a_huge_sparse_vma_walk_what_is_mapped()
    {
        var m = Mapped();
        List<SmapsEntry>? smaps = null;
        Assert.InRange(Steps(m, () => smaps = m.Mm.Smaps(Start, Start + Len)), 1, Bound);
        Assert.Equal(3, Assert.Single(smaps!).RssPages);

        PmScanResult? r = null;
        var scan = new PmScanArg { Start = Start, End = Start + Len, CategoryMask = Uapi.PageIsPresent, ReturnMask = Uapi.PageIsPresent, VecLen = 16 };
        Assert.InRange(Steps(m, () => r = m.Mm.PagemapScan(scan)), 1, Bound);
        Assert.Equal(Errno.OK, r!.Errno);
        Assert.Equal(s_pages, r.Regions.Select(g => g.Start));
        Assert.All(r.Regions, g => Assert.Equal(Pg, g.End - g.Start));
    }

    [Fact]
    public void Fork_mremap_and_munmap_of_a_huge_sparse_vma_walk_what_is_mapped()
    {
        var m = Mapped();
        var fork = new ForkOp();
        Assert.InRange(Steps(m, () => m.K.Start(m.T, fork)), 1, Bound);
        var buf = new byte[1];
        for (var i = 0; i < s_pages.Length; i++)
        {
            Assert.Equal(1, fork.Child!.PeekBytes(s_pages[i], buf));
            Assert.Equal((byte)(0x40 + i), buf[0]);
        }

        Assert.InRange(Steps(m, () => m.K.Start(m.K.CreateThread(m.Mm), new MunmapOp(Start, Len))), 1, Bound);
        Assert.Empty(m.Mm.Vmas);

        // A move needs room for both ranges below TASK_SIZE: 2^45 bytes each.
        const ulong half = Len / 2, to = Start + half;
        var n = Mapped(half);
        var pages = Pages(half);
        var mr = new MremapOp(Start, half, to);
        Assert.InRange(Steps(n, () => n.K.Start(n.T, mr)), 1, Bound);
        Assert.Equal(Errno.OK, mr.Result);
        for (var i = 0; i < pages.Length; i++)
        {
            Assert.Equal(1, n.Mm.PeekBytes(pages[i] - Start + to, buf));
            Assert.Equal((byte)(0x40 + i), buf[0]);
            Assert.True(n.PteAt(pages[i]).IsNone);
        }
    }
}
