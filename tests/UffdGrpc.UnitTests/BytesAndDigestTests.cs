using UffdGrpc.Mm;
using ThreadState = UffdGrpc.Mm.ThreadState;

namespace UffdGrpc.UnitTests;

public class BytesAndDigestTests
{
    private const ulong Pg = Machine.Pg;

    private static byte[] Pattern(int length, int seed)
    {
        var b = new byte[length];
        for (var i = 0; i < b.Length; i++)
            b[i] = (byte)((i * 7) + seed + 1);
        return b;
    }

    private static BytesAccessOp Run(Machine m, BytesAccessOp op, SimThread? t = null)
    {
        m.K.Start(t ?? m.T, op);
        return op;
    }

    /// <summary>Digests <paramref name="pages"/> pages of <paramref name="mm"/>.</summary>
    private static (PageContentState[] States, byte[] Hashes) Digest(Mm.Mm mm, ulong start, int pages)
    {
        var states = new PageContentState[pages];
        var hashes = new byte[pages * Mm.Mm.DigestSize];
        mm.Digest(start, (ulong)pages, states, hashes);
        return (states, hashes);
    }

    private static byte[] HashOf(byte[] hashes, int page) => hashes.AsSpan(page * Mm.Mm.DigestSize, Mm.Mm.DigestSize).ToArray();

    [Fact]
    public void An_unaligned_write_across_pages_and_vmas_reads_back()
    {
        var m = new Machine();
        var b = 0x7e40_0000_0000UL;
        var shm = m.K.CreateFile("shm", shmem: true, 2 * Pg);
        Assert.Equal(Errno.OK, m.Mm.Mmap(b, 2 * Pg, Prot.Read | Prot.Write, false, null, 0));
        Assert.Equal(Errno.OK, m.Mm.Mmap(b + (2 * Pg), 2 * Pg, Prot.Read | Prot.Write, true, shm, 0));
        Assert.Equal(2, m.Mm.VmasIn(b, b + (4 * Pg)).Count);

        var data = Pattern((int)(3 * Pg) + 123, seed: 3);
        var w = Run(m, BytesAccessOp.Write(b + 100, data));
        Assert.True(w.IsCompleted);
        Assert.Equal((data.Length, SigCode.None, Errno.OK), (w.Done, w.Signal, w.Result));
        Assert.True(w.Data.IsEmpty);

        var r = Run(m, BytesAccessOp.Read(b + 50, data.Length + 100));
        Assert.Equal(data.Length + 100, r.Done);
        var expected = new byte[data.Length + 100];
        data.CopyTo(expected, 50);
        Assert.Equal(expected, r.Data.ToArray());

        // The byte-0 access of AccessOp sees the same bytes, and its writes show up here.
        Assert.Equal(data[Pg - 100], m.Read(b + Pg).Values[0]);
        Assert.Equal(data[(2 * Pg) - 100], m.Read(b + (2 * Pg)).Values[0]);
        m.Write(b + (3 * Pg), 0xee);
        Assert.Equal(0xee, Run(m, BytesAccessOp.Read(b + (3 * Pg), 1, AccessOrigin.Kernel)).Data.Span[0]);

        var peek = new byte[4 * Pg];
        Assert.Equal(peek.Length, m.Mm.PeekBytes(b, peek));
        Assert.Equal(data.AsSpan(0, (int)Pg - 100).ToArray(), peek.AsSpan(100, (int)Pg - 100).ToArray());
        Assert.Equal(0xee, peek[3 * Pg]);
        // The shmem pages are in the page cache: a second mapping of the file sees the bytes.
        var alias = 0x7e41_0000_0000UL;
        Assert.Equal(Errno.OK, m.Mm.Mmap(alias, 2 * Pg, Prot.Read, true, shm, 0));
        var (states, _) = Digest(m.Mm, alias, 2);
        Assert.Equal([PageContentState.PageCache, PageContentState.PageCache], states);
        Assert.Equal(data[(2 * Pg) - 100], Run(m, BytesAccessOp.Read(alias, 1)).Data.Span[0]);
    }

    [Fact]
    public void A_write_blocks_at_the_first_missing_page_and_resumes_there_after_copy()
    {
        var m = new Machine();
        var a = m.Map(3);
        var u = m.Uffd();
        Assert.Equal(Errno.OK, u.Register(a + Pg, 2 * Pg, Uapi.RegisterModeMissing, out _));
        var data = Pattern((int)(2 * Pg), seed: 9);
        var w = Run(m, BytesAccessOp.Write(a + 10, data));

        Assert.False(w.IsCompleted);
        Assert.Equal(ThreadState.BlockedInUserfault, m.T.State);
        Assert.Equal((int)Pg - 10, w.Done);
        Assert.Equal(Errno.OK, u.Read(out var msg));
        Assert.Equal((UffdEvent.Pagefault, PagefaultFlags.Write, a + Pg), (msg!.Event, msg.Flags, msg.Address));

        // Page 0 is done: a change another thread makes to it now must survive the resumed access.
        m.Write(a + 5000 - 4096, 0x77, t: m.K.CreateThread(m.Mm));
        var fill = new byte[Pg];
        Array.Fill(fill, (byte)0x55);
        Assert.Equal(new FillResult(Errno.OK, (long)Pg), u.Copy(a + Pg, fill, 0x1000, Pg, 0));
        Assert.False(w.IsCompleted);
        Assert.Equal((int)(2 * Pg) - 10, w.Done);
        Assert.Equal(Errno.OK, u.Read(out msg));
        Assert.Equal(a + (2 * Pg), msg!.Address);
        Assert.Equal(Errno.OK, u.Copy(a + (2 * Pg), fill, 0x1000, Pg, 0).Errno);

        Assert.True(w.IsCompleted);
        Assert.Equal((data.Length, SigCode.None), (w.Done, w.Signal));
        Assert.Equal(Errno.EAGAIN, u.Read(out _));
        var back = new byte[3 * Pg];
        Assert.Equal(back.Length, m.Mm.PeekBytes(a, back));
        var expected = new byte[3 * Pg];
        data.CopyTo(expected, 10);
        expected[5000 - 4096] = 0x77;
        expected.AsSpan(10 + data.Length).Fill(0x55);
        Assert.Equal(expected, back);
    }

    [Fact]
    public void A_user_access_stops_with_a_signal_at_the_bad_page()
    {
        var m = new Machine();
        var a = m.Map(2);
        var w = Run(m, BytesAccessOp.Write(a + 5, Pattern((int)(3 * Pg), 1)));
        Assert.Equal((true, (int)(2 * Pg) - 5, SigCode.SegvMaperr, Errno.OK), (w.IsCompleted, w.Done, w.Signal, w.Result));
        var r = Run(m, BytesAccessOp.Read(a + 5, (int)(3 * Pg)));
        Assert.Equal(((int)(2 * Pg) - 5, SigCode.SegvMaperr), (r.Done, r.Signal));
        Assert.Equal(Pattern((int)(2 * Pg) - 5, 1), r.Data.ToArray());

        Assert.Equal(Errno.OK, m.Mm.Mprotect(a + Pg, Pg, Prot.Read));
        var ro = Run(m, BytesAccessOp.Write(a + 1, new byte[2 * Pg]));
        Assert.Equal(((int)Pg - 1, SigCode.SegvAccerr), (ro.Done, ro.Signal));
        Assert.Equal(0, m.Read(a + 1).Values[0]);
    }

    [Fact]
    public void A_kernel_access_gets_efault_with_the_bytes_before_the_bad_page()
    {
        var m = new Machine();
        var a = m.Map(2);
        var w = Run(m, BytesAccessOp.Write(a + 5, Pattern((int)(3 * Pg), 1), AccessOrigin.Kernel));
        Assert.Equal(((int)(2 * Pg) - 5, SigCode.None, Errno.EFAULT), (w.Done, w.Signal, w.Result));
        var r = Run(m, BytesAccessOp.Read(a + Pg, (int)(2 * Pg), AccessOrigin.Kernel));
        Assert.Equal(((int)Pg, Errno.EFAULT), (r.Done, r.Result));
        Assert.Equal(Pattern((int)(2 * Pg) - 5, 1).AsSpan((int)Pg - 5).ToArray(), r.Data.ToArray());

        // access_ok fails for a range past TASK_SIZE before anything is touched.
        var top = Kernel.TaskSize - Pg;
        Assert.Equal(Errno.OK, m.Mm.Mmap(top, Pg, Prot.Read | Prot.Write, false, null, 0));
        var over = Run(m, BytesAccessOp.Write(top, new byte[Pg + 1], AccessOrigin.Kernel));
        Assert.Equal((0, Errno.EFAULT), (over.Done, over.Result));
        Assert.Equal(0UL, m.Pagemap(top));
        var user = Run(m, BytesAccessOp.Write(top, Pattern((int)Pg + 1, 0)));
        Assert.Equal(((int)Pg, SigCode.SegvMaperr), (user.Done, user.Signal));

        // A kernel access to a uffd-MISSING page of a user-mode-only context is EFAULT, not a sleep.
        Assert.Equal(Errno.OK, m.K.Userfaultfd(m.Mm, Uapi.ONonblock | Uapi.UffdUserModeOnly, out var umo));
        umo!.Api(Uapi.UffdApi, 0, out _, out _);
        var c = m.Map(1);
        umo.Register(c, Pg, Uapi.RegisterModeMissing, out _);
        var k = Run(m, BytesAccessOp.Read(c + 9, 10, AccessOrigin.Kernel));
        Assert.Equal((true, 0, Errno.EFAULT), (k.IsCompleted, k.Done, k.Result));
    }

    [Fact]
    public void Digests_compare_contents_not_layout()
    {
        var m = new Machine(config: new MachineConfig { Swap = true });
        var data = Pattern((int)(4 * Pg) - 3, 5);

        // Address space 1: small pages written by one unaligned write, page 3 swapped out.
        var a = m.Map(6);
        Run(m, BytesAccessOp.Write(a + 3, data));
        m.K.Start(m.T, new MadviseOp(a + (3 * Pg), Pg, Madv.Pageout));
        Assert.True(m.PteAt(a + (3 * Pg)).IsSwap);
        m.Read(a + (4 * Pg));

        // Address space 2 (another process): one THP, written in three differently cut pieces.
        var mm2 = m.K.CreateMm();
        var t2 = m.K.CreateThread(mm2);
        var b = 0x7f00_0000_0000UL;
        Assert.Equal(Errno.OK, mm2.Mmap(b, 512 * Pg, Prot.Read | Prot.Write, false, null, 0));
        m.K.Start(t2, new MadviseOp(b, 512 * Pg, Madv.Hugepage));
        Run(m, BytesAccessOp.Write(b + 3, data.AsMemory(0, (int)Pg)), t2);
        Assert.True(m.K.Locked(() => mm2.PageTable.HugePmdOf(b)).TransHuge);
        var page = new byte[Pg];
        data.AsSpan((int)Pg - 3, (int)Pg).CopyTo(page);
        Run(m, BytesAccessOp.Write(b + Pg, page), t2);
        Run(m, BytesAccessOp.Write(b + (2 * Pg), data.AsMemory((2 * (int)Pg) - 3)), t2);

        var (s1, h1) = Digest(m.Mm, a, 6);
        var (s2, h2) = Digest(mm2, b, 6);
        Assert.Equal(
            [PageContentState.Present, PageContentState.Present, PageContentState.Present, PageContentState.Swapped, PageContentState.Present, PageContentState.NotPresent],
            s1);
        Assert.All(s2, s => Assert.Equal(PageContentState.Present, s));
        Assert.Equal(h1, h2);
        Assert.Equal(Mm.Mm.ZeroPageHash.ToArray(), HashOf(h1, 4));
        Assert.Equal(Mm.Mm.ZeroPageHash.ToArray(), HashOf(h1, 5));
        Assert.NotEqual(Mm.Mm.ZeroPageHash.ToArray(), HashOf(h1, 0));

        // One byte differs: only that page's digest changes.
        Run(m, BytesAccessOp.Write(b + (2 * Pg) + 17, new byte[] { 0xab }), t2);
        var (_, h3) = Digest(mm2, b, 6);
        for (var p = 0; p < 6; p++)
        {
            if (p == 2)
                Assert.NotEqual(HashOf(h1, p), HashOf(h3, p));
            else
                Assert.Equal(HashOf(h1, p), HashOf(h3, p));
        }
    }

    [Fact]
    public void Digest_and_peek_have_no_side_effects()
    {
        var m = new Machine(config: new MachineConfig { Swap = true });
        var a = m.Map(8);
        var u = m.Uffd(UffdFeatures.WpUnpopulated);
        Assert.Equal(Errno.OK, u.Register(a, 8 * Pg, Uapi.RegisterModeMissing | Uapi.RegisterModeWp, out _));
        Assert.Equal(Errno.OK, u.Copy(a, Pattern((int)Pg, 1), 0x1000, Pg, 0).Errno);  // 0 present
        Assert.Equal(Errno.OK, u.Copy(a + Pg, Pattern((int)Pg, 2), 0x1000, Pg, 0).Errno);
        m.K.Start(m.T, new MadviseOp(a + Pg, Pg, Madv.Pageout));                       // 1 swapped
        Assert.Equal(Errno.OK, u.Zeropage(a + (2 * Pg), Pg, 0).Errno);                  // 2 zero page
        Assert.Equal(Errno.OK, u.Poison(a + (3 * Pg), Pg, 0).Errno);                    // 3 poisoned
        Assert.Equal(Errno.OK, u.Writeprotect(a + (4 * Pg), Pg, Uapi.WriteprotectModeWp)); // 4 uffd-wp marker
        // 5..7 untouched: MISSING-registered, so a read would raise a userfault.
        Assert.True(m.PteAt(a + Pg).IsSwap);
        Assert.True(m.PteAt(a + (3 * Pg)).IsPoisonMarker);
        Assert.True(m.PteAt(a + (4 * Pg)).IsUffdWpMarker);

        var f = m.K.CreateFile("f", shmem: true, 2 * Pg);
        var w = m.Map(1, shared: true, file: f);
        Run(m, BytesAccessOp.Write(w, Pattern((int)Pg, 3)));
        var s = 0x7e80_0000_0000UL;
        Assert.Equal(Errno.OK, m.Mm.Mmap(s, 3 * Pg, Prot.Read, true, f, 0));          // cached, hole, beyond EOF

        ulong[] Snapshot() =>
        [
            .. Enumerable.Range(0, 8).Select(i => m.Pagemap(a + ((ulong)i * Pg))),
            .. Enumerable.Range(0, 3).Select(i => m.Pagemap(s + ((ulong)i * Pg))),
            (ulong)m.K.LiveFrames, (ulong)m.K.SwapSlotsInUse, (ulong)u.UnreadCount,
        ];
        var before = Snapshot();
        var ptes = Enumerable.Range(0, 8).Select(i => m.PteAt(a + ((ulong)i * Pg))).ToArray();

        var (states, hashes) = Digest(m.Mm, a, 8);
        var (fs, fh) = Digest(m.Mm, s - Pg, 5);
        var peek = new byte[8 * Pg];
        var peeked = m.Mm.PeekBytes(a, peek);

        Assert.Equal(before, Snapshot());
        Assert.Equal(ptes, Enumerable.Range(0, 8).Select(i => m.PteAt(a + ((ulong)i * Pg))).ToArray());
        Assert.Equal(ThreadState.Running, m.T.State);
        Assert.Equal(
            [PageContentState.Present, PageContentState.Swapped, PageContentState.Present, PageContentState.Poisoned,
             PageContentState.NotPresent, PageContentState.NotPresent, PageContentState.NotPresent, PageContentState.NotPresent],
            states);
        Assert.Equal(System.Security.Cryptography.SHA256.HashData(Pattern((int)Pg, 2)), HashOf(hashes, 1));
        Assert.Equal(Mm.Mm.ZeroPageHash.ToArray(), HashOf(hashes, 2));
        Assert.Equal(new byte[Mm.Mm.DigestSize], HashOf(hashes, 3));
        Assert.Equal(Mm.Mm.ZeroPageHash.ToArray(), HashOf(hashes, 7));
        Assert.Equal(
            [PageContentState.Unmapped, PageContentState.PageCache, PageContentState.NotPresent, PageContentState.BeyondEof, PageContentState.Unmapped],
            fs);
        Assert.Equal(System.Security.Cryptography.SHA256.HashData(Pattern((int)Pg, 3)), HashOf(fh, 1));
        Assert.Equal(new byte[Mm.Mm.DigestSize], HashOf(fh, 0));

        // The peek stops before the poisoned page and saw the swapped bytes.
        Assert.Equal(3 * (int)Pg, peeked);
        Assert.Equal(Pattern((int)Pg, 2), peek.AsSpan((int)Pg, (int)Pg).ToArray());

        // A read afterwards still faults normally: the swapped page comes back with its bytes.
        var r = Run(m, BytesAccessOp.Read(a + Pg, (int)Pg));
        Assert.Equal(Pattern((int)Pg, 2), r.Data.ToArray());
    }

    [Fact]
    public void A_digest_of_a_large_untouched_range_is_zero_fill_in_bulk()
    {
        var m = new Machine();
        const ulong pages = 1 << 18; // 1 GiB
        var a = m.Map(pages);
        m.Write(a + (200_000 * Pg), 1);
        var (states, hashes) = Digest(m.Mm, a - (2 * Pg), (int)pages + 4);
        Assert.Equal(PageContentState.Unmapped, states[0]);
        Assert.Equal(PageContentState.Present, states[200_002]);
        Assert.Equal(1, states.Count(s => s == PageContentState.Present));
        Assert.Equal(PageContentState.Unmapped, states[^1]);
        Assert.Equal(PageContentState.NotPresent, states[2]);
        Assert.Equal(Mm.Mm.ZeroPageHash.ToArray(), HashOf(hashes, (int)pages + 1));
        Assert.Single(m.K.Locked(() => m.Mm.PageTable.PopulatedSlots().ToList()));
    }
}
