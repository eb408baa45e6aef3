using System.Buffers.Binary;
using System.Diagnostics;
using UffdGrpc.Mm;

namespace UffdGrpc.UnitTests;

/// <summary>Guest workloads in the model: seeded page sequences, the byte layout of their writes, pacing, and their accesses faulting like any other.</summary>
public class GuestWorkloadTests
{
    private const ulong Base = 0x7e00_0000_0000;

    private static List<(ulong, GuestAccessKind)> Draw(GuestWorkloadSpec spec, int thread, int n)
    {
        var s = new GuestWorkloadPlan(spec).Stream(thread);
        return [.. Enumerable.Range(0, n).Select(_ => s.Next())];
    }

    [Theory]
    [InlineData(GuestPattern.Sequential)]
    [InlineData(GuestPattern.Uniform)]
    [InlineData(GuestPattern.HotsetZipf)]
    [InlineData(GuestPattern.Hotset9010)]
    [InlineData(GuestPattern.QemuMigrationTest)]
    public void The_same_seed_gives_the_same_accesses_and_another_seed_others(GuestPattern pattern)
    {
        var spec = new GuestWorkloadSpec(Base, 256 * Machine.Pg, pattern, Seed: 42, Threads: 3, WriteRatio: 0.5);
        for (var t = 0; t < 3; t++)
            Assert.Equal(Draw(spec, t, 2000), Draw(spec, t, 2000));
        Assert.NotEqual(Draw(spec, 0, 2000), Draw(spec, 1, 2000));
        if (pattern is not (GuestPattern.Sequential or GuestPattern.QemuMigrationTest))
            Assert.NotEqual(Draw(spec, 0, 2000), Draw(spec with { Seed = 43 }, 0, 2000));
        Assert.All(Draw(spec, 2, 2000), a => Assert.True(a.Item1 >= Base && a.Item1 < Base + (256 * Machine.Pg) && a.Item1 % Machine.Pg == 0));
    }

    [Fact]
    public void Sequential_and_qemu_threads_walk_their_own_slice_and_wrap()
    {
        var spec = new GuestWorkloadSpec(Base, 10 * Machine.Pg, GuestPattern.QemuMigrationTest, Seed: 1, Threads: 3);
        // Slices of 10 pages over 3 threads: [0,3) [3,6) [6,10).
        Assert.Equal([0UL, 1, 2, 0, 1], Draw(spec, 0, 5).Select(a => (a.Item1 - Base) / Machine.Pg));
        Assert.Equal([6UL, 7, 8, 9, 6], Draw(spec, 2, 5).Select(a => (a.Item1 - Base) / Machine.Pg));
        Assert.All(Draw(spec, 1, 20), a => Assert.Equal(GuestAccessKind.Increment, a.Item2));
    }

    [Fact]
    public void Hotset_90_10_sends_nine_accesses_in_ten_to_a_tenth_of_the_pages()
    {
        var spec = new GuestWorkloadSpec(Base, 1000 * Machine.Pg, GuestPattern.Hotset9010, Seed: 7, WriteRatio: 0.25);
        var plan = new GuestWorkloadPlan(spec);
        var s = plan.Stream(0);
        int hot = 0, writes = 0;
        const int n = 20000;
        for (var i = 0; i < n; i++)
        {
            var (a, k) = s.Next();
            var p = (a - Base) / Machine.Pg;
            if (p >= plan.HotFirst && p < plan.HotFirst + plan.HotPages)
                hot++;
            if (k == GuestAccessKind.WritePattern)
                writes++;
        }
        Assert.Equal(100UL, plan.HotPages);
        Assert.InRange(hot / (double)n, 0.87, 0.93);
        Assert.InRange(writes / (double)n, 0.22, 0.28);
    }

    [Fact]
    public void Zipf_makes_the_first_rank_the_most_frequent_page()
    {
        var spec = new GuestWorkloadSpec(Base, 512 * Machine.Pg, GuestPattern.HotsetZipf, Seed: 9);
        var counts = Draw(spec, 0, 20000).GroupBy(a => a.Item1).Select(g => g.Count()).OrderDescending().ToList();
        // P(rank 1) = 1/H(512) ≈ 0.147 with exponent 1; rank 2 half of it.
        Assert.InRange(counts[0] / 20000.0, 0.12, 0.18);
        Assert.InRange(counts[1] / (double)counts[0], 0.4, 0.6);
    }

    [Fact]
    public void Pacing_spreads_the_rate_over_the_threads_and_op_counts_add_up()
    {
        var spec = new GuestWorkloadSpec(Base, 64 * Machine.Pg, GuestPattern.Uniform, Seed: 1, Threads: 4, WriteRatio: 0.5, DirtyRate: 1000, OpCount: 10);
        // 1000 writes/s at one write in two: 2000 accesses/s, each thread 500/s: access n is due at n·2 ms.
        Assert.Equal(2000, spec.AccessesPerSecond);
        Assert.Equal(Stopwatch.Frequency * 2 / 1000 * 5, spec.DueTicks(5), tolerance: 2);
        Assert.Equal(0, (spec with { DirtyRate = 0 }).DueTicks(5));
        Assert.Equal(10UL, Enumerable.Range(0, 4).Aggregate(0UL, (s, i) => s + spec.OpsOfThread(i)));
        Assert.Equal([3UL, 3, 2, 2], Enumerable.Range(0, 4).Select(spec.OpsOfThread));
        Assert.Equal(ulong.MaxValue, (spec with { OpCount = 0 }).OpsOfThread(0));
    }

    [Theory]
    [InlineData(1UL, 4096UL, 1, 0.0, 0.0, 1.0, "start")]
    [InlineData(0UL, 0UL, 1, 0.0, 0.0, 1.0, "length")]
    [InlineData(0UL, 4097UL, 1, 0.0, 0.0, 1.0, "length")]
    [InlineData(0UL, 4096UL, 0, 0.0, 0.0, 1.0, "threads")]
    [InlineData(0UL, 4096UL, 2, 0.0, 0.0, 1.0, "threads")]
    [InlineData(0UL, 4096UL, 1, 1.5, 0.0, 1.0, "write_ratio")]
    [InlineData(0UL, 4096UL, 1, 0.5, -1.0, 1.0, "dirty_rate_pages_per_sec")]
    [InlineData(0UL, 4096UL, 1, 0.5, 0.0, 0.0, "zipf_exponent")]
    public void Invalid_specs_name_their_field(ulong start, ulong length, int threads, double ratio, double rate, double zipf, string field)
    {
        var spec = new GuestWorkloadSpec(Base + start, length, GuestPattern.Sequential, 0, threads, ratio, rate, ZipfExponent: zipf);
        Assert.Equal(field, spec.Invalid()?.Field);
        Assert.Null(new GuestWorkloadSpec(Base, 4096, GuestPattern.Sequential, 0).Invalid());
    }

    /// <summary>The documented layout, computed here independently of the model.</summary>
    private static ulong Mix(ulong a, ulong g)
    {
        var z = a ^ (g * 0xD1B5_4A32_D192_ED03);
        z = (z ^ (z >> 30)) * 0xBF58_476D_1CE4_E5B9;
        z = (z ^ (z >> 27)) * 0x94D0_49BB_1331_11EB;
        return z ^ (z >> 31);
    }

    private static GuestAccessOp Run(Machine m, ulong addr, GuestAccessKind kind, SimThread? t = null)
    {
        var op = new GuestAccessOp(addr, kind, new byte[4096]);
        m.K.Start(t ?? m.T, op);
        return op;
    }

    [Fact]
    public void A_write_stores_address_generation_and_the_derived_words_and_takes_the_next_sequence_number()
    {
        var m = new Machine();
        var a = m.Map(2);
        var w1 = Run(m, a, GuestAccessKind.WritePattern);
        var w2 = Run(m, a + Machine.Pg, GuestAccessKind.WritePattern);
        var w3 = Run(m, a, GuestAccessKind.WritePattern);
        Assert.True(w1.IsCompleted && w2.IsCompleted && w3.IsCompleted);
        Assert.Equal((1UL, 1UL, 2UL), (w1.Generation, w2.Generation, w3.Generation));
        Assert.Equal((1UL, 2UL, 3UL), (w1.Seq, w2.Seq, w3.Seq));
        Assert.Equal(3UL, m.K.WriteSeq);

        var page = new byte[4096];
        Assert.Equal(4096, m.Mm.PeekBytes(a, page));
        Assert.Equal(a, BinaryPrimitives.ReadUInt64LittleEndian(page));
        Assert.Equal(2UL, BinaryPrimitives.ReadUInt64LittleEndian(page.AsSpan(8)));
        for (var j = 2; j < 512; j++)
            Assert.Equal(Mix(a, 2) + ((ulong)j * 0x9E37_79B9_7F4A_7C15), BinaryPrimitives.ReadUInt64LittleEndian(page.AsSpan(j * 8)));

        var read = Run(m, a + Machine.Pg, GuestAccessKind.Read);
        Assert.True(read.IsCompleted);
        Assert.Equal(0UL, read.Seq);
        Assert.Equal(3UL, m.K.WriteSeq);
    }

    [Fact]
    public void The_qemu_guest_increments_byte_0_and_leaves_the_rest()
    {
        var m = new Machine();
        var a = m.Map(1);
        m.Write(a + 1, 0xAB);
        for (var i = 1; i <= 3; i++)
        {
            var op = Run(m, a, GuestAccessKind.Increment);
            Assert.Equal((ulong)i, op.Generation);
        }
        var b = new byte[2];
        m.Mm.PeekBytes(a, b);
        Assert.Equal([3, 0xAB], b);
    }

    [Fact]
    public void A_workload_access_sleeps_in_the_userfault_and_stores_once_the_page_is_placed()
    {
        var m = new Machine();
        var a = m.Map(1);
        var ctx = m.Uffd();
        Assert.Equal(Errno.OK, ctx.Register(a, Machine.Pg, Uapi.RegisterModeMissing, out _));
        var group = new BlocktimeGroup(m.K);
        var t = m.K.CreateThread(m.Mm, group);
        var op = Run(m, a, GuestAccessKind.WritePattern, t);
        Assert.False(op.IsCompleted);
        Assert.Equal(UffdGrpc.Mm.ThreadState.BlockedInUserfault, t.State);
        Assert.Equal(1, t.Userfaults);
        Assert.Equal(0UL, m.K.WriteSeq);
        Assert.Equal(Errno.OK, ctx.Read(out var msg));
        Assert.Equal(a, msg!.Address);
        Assert.Equal(Errno.OK, ctx.Zeropage(a, Machine.Pg, 0).Errno);
        Assert.True(op.IsCompleted);
        Assert.Equal((1UL, 1UL), (op.Generation, op.Seq));
        Assert.True(group.Blocktime > TimeSpan.Zero);
    }

    [Fact]
    public void A_thread_that_exits_asleep_leaves_the_userfault_and_its_message_is_withdrawn()
    {
        var m = new Machine();
        var a = m.Map(1);
        var ctx = m.Uffd();
        Assert.Equal(Errno.OK, ctx.Register(a, Machine.Pg, Uapi.RegisterModeMissing, out _));
        var t = m.K.CreateThread(m.Mm, new BlocktimeGroup(m.K));
        var op = Run(m, a, GuestAccessKind.Read, t);
        Assert.Equal(1, ctx.BlockedFaults);
        m.K.ExitThread(t);
        Assert.True(op.Aborted);
        Assert.Equal(0, ctx.BlockedFaults);
        Assert.Equal(Errno.EAGAIN, ctx.Read(out _));
        Assert.False(m.Mm.Exited);
    }

    [Fact]
    public void A_group_thread_asleep_while_its_sibling_runs_gives_the_group_no_blocktime()
    {
        var m = new Machine();
        var a = m.Map(2);
        var ctx = m.Uffd();
        Assert.Equal(Errno.OK, ctx.Register(a, 2 * Machine.Pg, Uapi.RegisterModeMissing, out _));
        var g = new BlocktimeGroup(m.K);
        var t1 = m.K.CreateThread(m.Mm, g);
        var t2 = m.K.CreateThread(m.Mm, g);
        var op = Run(m, a, GuestAccessKind.Read, t1);
        Thread.Sleep(10);
        ctx.Zeropage(a, Machine.Pg, 0);
        Assert.True(op.IsCompleted);
        Assert.True(t1.Blocktime >= TimeSpan.FromMilliseconds(10));
        Assert.Equal(TimeSpan.Zero, g.Blocktime);
        // Both asleep: the overlap counts once.
        var r1 = Run(m, a + Machine.Pg, GuestAccessKind.Read, t1);
        var r2 = Run(m, a + Machine.Pg, GuestAccessKind.Read, t2);
        Thread.Sleep(10);
        ctx.Zeropage(a + Machine.Pg, Machine.Pg, 0);
        Assert.True(r1.IsCompleted && r2.IsCompleted);
        Assert.True(g.Blocktime >= TimeSpan.FromMilliseconds(10), $"{g.Blocktime}");
        Assert.True(g.Blocktime <= t2.Blocktime);
    }
}
