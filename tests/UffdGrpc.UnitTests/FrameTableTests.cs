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
}
