using System.Diagnostics;
using UffdGrpc.Mm;
using ThreadState = UffdGrpc.Mm.ThreadState;

namespace UffdGrpc.UnitTests;

/// <summary>The machine's memory size, direct reclaim, swap size, the OOM killer and the host budget hook.</summary>
public class MemoryLimitTests
{
    private const ulong Pg = Machine.Pg;

    private static MachineConfig Mib(ulong mib, ulong swapKib = 0) => new()
    {
        MemoryBytes = mib << 20,
        Swap = swapKib > 0,
        SwapBytes = swapKib << 10,
    };

    [Fact]
    public void Defaults_are_4_GiB_of_ram_and_1_GiB_of_swap()
    {
        var k = new Kernel();
        Assert.Equal(4UL << 30, k.MemoryBytes);
        Assert.Equal(1L << 20, k.TotalPages);
        Assert.Equal(0, k.SwapTotalPages);
        Assert.Equal(1L << 18, new Kernel(config: new MachineConfig { Swap = true }).SwapTotalPages);
        Assert.Equal(0, k.UsedPages);
    }

    [Fact]
    public void Allocation_up_to_the_limit_counts_pages_and_page_tables()
    {
        var m = new Machine(config: Mib(4));
        var a = m.Map(1000);
        var w = m.Write(a, 7, 1000);
        Assert.Equal(1000, w.Done);
        Assert.Equal(1000, m.K.LiveFrames);
        // One PUD table, one PMD table and two PTE tables.
        Assert.Equal(4, m.K.PageTablePages);
        Assert.Equal(4, m.Mm.PageTable.Pages);
        Assert.Equal(1004, m.K.UsedPages);
        Assert.Empty(m.K.OomKills);
        m.Mm.Exit();
        Assert.Equal(0, m.K.UsedPages);
    }

    [Fact]
    public void Writing_past_the_limit_kills_the_only_process_and_frees_its_memory()
    {
        var m = new Machine(config: Mib(4));
        var a = m.Map(2048);
        var w = m.Write(a, 1, 2048);
        Assert.True(w.Aborted);
        Assert.Equal(ThreadState.Exited, m.T.State);
        Assert.True(m.Mm.Exited);
        Assert.Equal(0, m.K.UsedPages);
        var kill = Assert.Single(m.K.OomKills);
        Assert.Equal(m.Mm.Id, kill.VictimMmId);
        Assert.Equal("Out of memory", kill.Reason);
        Assert.Equal(OomCause.MachineMemory, kill.Cause);
        Assert.Equal(kill.RssPages + kill.SwapEntries + kill.PgtablePages, kill.Badness);
        Assert.Equal(1024, kill.RssPages + kill.PgtablePages);
        Assert.Equal([m.T.Tid], kill.KilledTids);
    }

    [Fact]
    public void Clean_page_cache_is_dropped_before_anon_goes_to_swap()
    {
        var m = new Machine(config: Mib(4, swapKib: 4096));
        var file = m.K.CreateFile("data", shmem: false, 128 * Pg);
        var f = m.Map(128, Prot.Read, file: file);
        Assert.Equal(128, m.Read(f, 128).Done);
        Assert.Equal(128, m.K.LiveFrames);
        var a = m.Map(2048);
        // Fill RAM with anon pages: the file pages go first, nothing is swapped meanwhile.
        var room = (int)(m.K.TotalPages - m.K.UsedPages) - 2;
        Assert.Equal(room + 64, m.Write(a, 9, room + 64).Done);
        Assert.Equal(0, m.K.SwapUsedPages);
        Assert.True(CachedFilePages(m, f, 128) <= 64);
        Assert.Empty(m.K.OomKills);
        // Beyond what the cache can give, anon pages go to swap; the file pages are all gone first.
        Assert.Equal(256, m.Write(a + ((ulong)(room + 64) * Pg), 9, 256).Done);
        Assert.True(m.K.SwapUsedPages > 0);
        Assert.Equal(0, CachedFilePages(m, f, 128));
        Assert.Empty(m.K.OomKills);
        Assert.True(m.K.UsedPages <= m.K.TotalPages);
        // Swapped-out contents come back.
        Assert.Equal(9, m.Read(a).Values[0]);
    }

    [Fact]
    public void Madv_free_pages_are_dropped_without_swap()
    {
        var m = new Machine(config: Mib(4));
        var lazy = m.Map(512);
        Assert.Equal(512, m.Write(lazy, 5, 512).Done);
        m.K.Start(m.T, new MadviseOp(lazy, 512 * Pg, Madv.Free));
        var a = m.Map(1024);
        Assert.Equal(900, m.Write(a, 6, 900).Done);
        Assert.Empty(m.K.OomKills);
        Assert.Equal(0UL, m.Pagemap(lazy) & (1UL << 63));
        Assert.Equal(0, m.Read(lazy).Values[0]);
        Assert.True(m.K.UsedPages <= m.K.TotalPages);
    }

    [Fact]
    public void The_biggest_process_is_killed_with_its_blocked_threads()
    {
        var m = new Machine(config: Mib(4));
        var big = m.Map(600);
        Assert.Equal(600, m.Write(big, 1, 600).Done);
        var missing = m.Map(1);
        var u = m.Uffd();
        Assert.Equal(Errno.OK, u.Register(missing, Pg, Uapi.RegisterModeMissing, out _));
        var sleeper = m.K.CreateThread(m.Mm);
        var blocked = m.Read(missing, t: sleeper);
        Assert.Equal(ThreadState.BlockedInUserfault, sleeper.State);

        var small = m.K.CreateMm();
        var t1 = m.K.CreateThread(small);
        var t2 = m.K.CreateThread(small);
        const ulong sa = 0x6000_0000_0000;
        Assert.Equal(Errno.OK, small.Mmap(sa, 1024 * Pg, Prot.Read | Prot.Write, false, null, 0));
        var first = new AccessOp(sa, true, 2, 100, AccessOrigin.User);
        m.K.Start(t1, first);
        Assert.Equal(100, first.Done);
        var more = new AccessOp(sa + (100 * Pg), true, 3, 400, AccessOrigin.User);
        m.K.Start(t2, more);

        Assert.Equal(400, more.Done);
        Assert.False(small.Exited);
        var kill = Assert.Single(m.K.OomKills);
        Assert.Equal(m.Mm.Id, kill.VictimMmId);
        Assert.Equal(kill.RssPages + kill.SwapEntries + kill.PgtablePages, kill.Badness);
        Assert.True(m.Mm.Exited);
        Assert.True(blocked.Aborted);
        Assert.Equal(ThreadState.Exited, sleeper.State);
        Assert.Equal(ThreadState.Exited, m.T.State);
        Assert.Equal(0, u.BlockedFaults);
        Assert.Equal(500, m.K.LiveFrames);
        Assert.Equal(500 + small.PageTable.Pages, m.K.UsedPages);
    }

    [Fact]
    public void Oom_score_adj_shields_a_process_and_shifts_badness()
    {
        var m = new Machine(config: Mib(4));
        Assert.Equal(Errno.EINVAL, m.Mm.SetOomScoreAdj(-1001));
        Assert.Equal(Errno.OK, m.Mm.SetOomScoreAdj(Kernel.OomScoreAdjMin));
        Assert.Equal(0, m.Mm.OomScore());
        var big = m.Map(600);
        Assert.Equal(600, m.Write(big, 1, 600).Done);
        var other = m.K.CreateMm();
        var t = m.K.CreateThread(other);
        const ulong oa = 0x6000_0000_0000;
        other.Mmap(oa, 1024 * Pg, Prot.Read | Prot.Write, false, null, 0);
        var w = new AccessOp(oa, true, 1, 1024, AccessOrigin.User);
        m.K.Start(t, w);
        // The shielded big process survives; the allocating one is the victim.
        Assert.True(w.Aborted);
        Assert.True(other.Exited);
        Assert.False(m.Mm.Exited);
        Assert.Equal(other.Id, Assert.Single(m.K.OomKills).VictimMmId);
    }

    [Fact]
    public void Copy_is_enomem_when_nothing_can_be_reclaimed_or_killed()
    {
        var m = new Machine(config: Mib(4));
        Assert.Equal(Errno.OK, m.Mm.SetOomScoreAdj(Kernel.OomScoreAdjMin));
        var a = m.Map(2048);
        Assert.Equal(900, m.Write(a, 1, 900).Done);
        var dst = m.Map(512);
        var u = m.Uffd();
        Assert.Equal(Errno.OK, u.Register(dst, 512 * Pg, Uapi.RegisterModeMissing, out _));
        var room = m.K.TotalPages - m.K.UsedPages;
        var src = new byte[512 * Pg];
        var r = u.Copy(dst, src, 0x1000, 512 * Pg, 0);
        Assert.Equal(Errno.EAGAIN, r.Errno);
        // One frame goes to the destination's PTE table.
        Assert.Equal((long)Pg * (room - 1), r.Field);
        Assert.Equal(m.K.TotalPages, m.K.UsedPages);
        r = u.Copy(dst + ((ulong)(room - 1) * Pg), src, 0x1000, Pg, 0);
        Assert.Equal(Errno.ENOMEM, r.Errno);
        Assert.Equal(-(long)Errno.ENOMEM, r.Field);
        Assert.False(m.Mm.Exited);
        Assert.All(m.K.OomKills, k => Assert.Null(k.VictimMmId));
        Assert.Equal("Out of memory and no killable processes...", m.K.OomKills[^1].Reason);
    }

    [Fact]
    public void Zeropage_of_2_pow_46_bytes_stops_at_the_machine_memory()
    {
        var m = new Machine(config: Mib(1));
        const ulong start = 0x1000_0000_0000;
        const ulong len = 1UL << 46;
        Assert.Equal(Errno.OK, m.Mm.Mmap(start, len, Prot.Read | Prot.Write, false, null, 0));
        var u = m.Uffd();
        Assert.Equal(Errno.OK, u.Register(start, len, Uapi.RegisterModeMissing, out _));
        var sw = Stopwatch.StartNew();
        var r = u.Zeropage(start, len, 0);
        Assert.True(sw.Elapsed < TimeSpan.FromSeconds(5), $"took {sw.Elapsed}");
        // Page tables filled the 256 frames; the OOM killer chose the mm being filled.
        Assert.Equal(Errno.EAGAIN, r.Errno);
        Assert.InRange(r.Field!.Value, 1, 256 * (long)Kernel.PmdSize);
        Assert.True(m.Mm.Exited);
        Assert.Equal(m.Mm.Id, Assert.Single(m.K.OomKills).VictimMmId);
        Assert.Equal(0, m.K.UsedPages);
        Assert.Equal(Errno.ESRCH, u.Zeropage(start, Pg, 0).Errno);
    }

    [Fact]
    public void Populate_of_2_pow_46_bytes_stops_at_the_machine_memory()
    {
        var m = new Machine(config: Mib(1));
        var sw = Stopwatch.StartNew();
        Assert.Equal(Errno.OK, m.Mm.Mmap(0x1000_0000_0000, 1UL << 46, Prot.Read | Prot.Write, false, null, 0, populate: true));
        Assert.True(m.Mm.Exited);
        Assert.Equal(0, m.K.UsedPages);

        var m2 = new Machine(config: Mib(1));
        Assert.Equal(Errno.OK, m2.Mm.Mmap(0x1000_0000_0000, 1UL << 46, Prot.Read | Prot.Write, false, null, 0));
        var pop = MadviseOp.Create(0x1000_0000_0000, 1UL << 46, Madv.PopulateRead);
        m2.K.Start(m2.T, pop);
        Assert.True(pop.Aborted);
        Assert.True(m2.Mm.Exited);
        Assert.Equal(0, m2.K.UsedPages);
        Assert.True(sw.Elapsed < TimeSpan.FromSeconds(5), $"took {sw.Elapsed}");
    }

    [Fact]
    public void A_full_swap_device_fails_swap_out()
    {
        var m = new Machine(config: Mib(4, swapKib: 64));
        Assert.Equal(16, m.K.SwapTotalPages);
        var a = m.Map(32);
        Assert.Equal(32, m.Write(a, 4, 32).Done);
        m.K.Start(m.T, new MadviseOp(a, 32 * Pg, Madv.Pageout));
        Assert.Equal(16, m.K.SwapUsedPages);
        Assert.Equal(16, m.K.LiveFrames);
    }

    [Fact]
    public void A_refusing_host_budget_reclaims_then_kills_like_a_full_machine()
    {
        var budget = new CountingBudget(limit: 300);
        var a = new Machine();
        var b = new Machine();
        a.K.FrameBudget = budget;
        b.K.FrameBudget = budget;
        var pa = a.Map(200);
        Assert.Equal(200, a.Write(pa, 1, 200).Done);
        var pb = b.Map(200);
        var w = b.Write(pb, 2, 200);
        Assert.True(w.Aborted);
        Assert.True(b.Mm.Exited);
        var kill = Assert.Single(b.K.OomKills);
        Assert.Equal(OomCause.HostBudget, kill.Cause);
        Assert.Empty(a.K.OomKills);
        Assert.Equal(a.K.UsedPages, budget.Used);
        Assert.Equal(0, b.K.UsedPages);
    }

    [Fact]
    public void Oom_events_are_reported_after_the_lock_is_released()
    {
        var m = new Machine(config: Mib(1));
        OomKill? seen = null;
        var locked = true;
        m.K.OomKilled += e =>
        {
            seen = e;
            locked = Monitor.IsEntered(m.K.Lock);
        };
        var a = m.Map(512);
        m.Write(a, 1, 512);
        Assert.NotNull(seen);
        Assert.False(locked);
        Assert.Equal(1, m.K.OomKillCount);
        Assert.Equal(seen, m.K.OomKills[0]);
    }

    private static int CachedFilePages(Machine m, ulong addr, int pages)
    {
        var n = 0;
        for (var i = 0; i < pages; i++)
        {
            if ((m.Pagemap(addr + ((ulong)i * Pg)) & (1UL << 63)) != 0)
                n++;
        }
        return n;
    }

    private sealed class CountingBudget(long limit) : IFrameBudget
    {
        private long _used;

        public long Used => Interlocked.Read(ref _used);

        public bool TryCharge(Kernel machine, long pages)
        {
            if (Interlocked.Add(ref _used, pages) <= limit)
                return true;
            Interlocked.Add(ref _used, -pages);
            return false;
        }

        public void ForceCharge(Kernel machine, long pages) => Interlocked.Add(ref _used, pages);

        public void Uncharge(Kernel machine, long pages) => Interlocked.Add(ref _used, -pages);
    }
}
