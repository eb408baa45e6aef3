using UffdGrpc.Mm;

namespace UffdGrpc.UnitTests;

/// <summary>The frame table keeps what live frames need, not a slot for every allocation the machine ever made.</summary>
public class FrameTableTests
{
    [Fact]
    public void Write_and_dontneed_churn_keeps_the_frame_table_bounded_and_pfns_increasing()
    {
        var m = new Machine();
        var a = m.Map(64);
        var keep = m.Map(1);
        Assert.Equal(1, m.Write(keep, 9).Done);
        var first = m.Pagemap(keep) & Uapi.PmPfnMask;
        ulong last = 0;
        for (var round = 0; round < 200; round++)
        {
            Assert.Equal(64, m.Write(a, (byte)(round + 1), 64).Done);
            var pfn = m.Pagemap(a + (63 * Machine.Pg)) & Uapi.PmPfnMask;
            Assert.True(pfn > last, "frame numbers are never reused");
            last = pfn;
            var op = new MadviseOp(a, 64 * Machine.Pg, Madv.Dontneed);
            m.K.Start(m.T, op);
            Assert.True(op.IsCompleted);
        }
        // 12,800 frames were allocated and freed (25 chunks' worth); one long-lived page and
        // the zero page keep their chunks, and nothing else is held.
        Assert.Equal(1, m.K.LiveFrames);
        Assert.InRange(m.K.FrameTableChunks, 1, 3);
        Assert.Equal((byte)9, m.K.PageOf(first)!.ReadByte(0));
        Assert.Null(m.K.PageOf(last));
        Assert.Empty(m.K.CheckInvariants());
    }

    [Fact]
    public void Contents_churn_keeps_the_content_slabs_bounded_and_a_reused_slot_reads_as_zeros()
    {
        var m = new Machine();
        var a = m.Map(64);
        var keep = m.Map(1);
        Assert.Equal(1, m.Write(keep, 9).Done);
        var full = new byte[64 * (int)Machine.Pg];
        Array.Fill(full, (byte)0xff);
        for (var round = 0; round < 200; round++)
        {
            if (round % 2 == 0)
            {
                // Every byte of every page: the slots these pages take must come back cleared.
                var w = BytesAccessOp.Write(a, full);
                m.K.Start(m.T, w);
                Assert.Equal(full.Length, w.Done);
            }
            else
            {
                Assert.Equal(64, m.Write(a, (byte)round, 64).Done);
                for (var p = 0UL; p < 64; p++)
                {
                    var page = m.PageAt(a + (p * Machine.Pg));
                    Assert.Equal((byte)round, page.ReadByte(0));
                    Assert.False(page.Contents[1..].ContainsAnyExcept((byte)0), "a reused slot reads as zeros");
                }
            }
            Assert.Equal(65, m.K.FramesWithContents);
            var op = new MadviseOp(a, 64 * Machine.Pg, Madv.Dontneed);
            m.K.Start(m.T, op);
            Assert.True(op.IsCompleted);
            Assert.Equal(1, m.K.FramesWithContents);
        }
        // 12,800 pages' contents came and went (800 slabs' worth): the long-lived page's slab
        // and at most one empty slab kept for the next fault are held, nothing else.
        Assert.InRange(m.K.ContentSlabs, 1, 2);
        Assert.Equal((byte)9, m.PageAt(keep).ReadByte(0));
        Assert.Empty(m.K.CheckInvariants());
    }
}
