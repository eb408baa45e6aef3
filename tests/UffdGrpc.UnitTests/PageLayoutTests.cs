using UffdGrpc.Mm;

namespace UffdGrpc.UnitTests;

/// <summary>
/// A frame packs its map count and pins into one word beside the PFN and the page flags;
/// counts past those bits move to the frame's side object and back without changing what
/// the model computes.
/// </summary>
public class PageLayoutTests
{
    private const ulong A = 0x7e00_0000_0000;
    private const ulong Pg = Machine.Pg;

    [Fact]
    public void A_page_cache_page_mapped_ten_thousand_times_counts_every_mapping_and_back_to_zero()
    {
        var m = new Machine();
        var f = m.K.CreateFile("many", shmem: true, size: Pg);
        const int maps = 10_000;
        for (var i = 0UL; i < maps; i++)
        {
            // Every other page, so that no two VMAs merge.
            Assert.Equal(Errno.OK, m.Mm.Mmap(A + (2 * i * Pg), Pg, Prot.Read | Prot.Write, shared: true, f, 0));
            Assert.Equal(1, m.Access(A + (2 * i * Pg), write: i == 0, value: 0x5a).Done);
        }
        var page = m.PageAt(A);
        Assert.Equal(maps, page.MapCount);
        Assert.Equal((byte)0x5a, m.PageAt(A + (2 * (maps - 1) * Pg)).ReadByte(0));
        Assert.Empty(m.K.CheckInvariants());
        for (var i = 0UL; i < maps; i++)
            m.K.Start(m.T, new MunmapOp(A + (2 * i * Pg), Pg));
        Assert.Equal(0, page.MapCount);
        Assert.Same(f, page.Mapping);
        Assert.Equal((byte)0x5a, page.ReadByte(0));
        Assert.Empty(m.K.CheckInvariants());
    }

    [Fact]
    public void Ten_long_term_pins_on_one_page_are_all_held_and_all_released()
    {
        var m = new Machine();
        var a = m.Map(1);
        Assert.Equal(1, m.Write(a, 7).Done);
        var page = m.PageAt(a);
        var rules = new List<int>();
        for (var i = 0; i < 10; i++)
        {
            // A rule pins a page once; ten rules over the same page pin it ten times.
            var rule = m.K.AddInjectRule(new InjectRule { Site = InjectSite.LongtermPin, Start = a, End = a + Pg }, out _);
            Assert.Single(m.K.FireNow(rule!.Id, out _));
            rules.Add(rule.Id);
        }
        Assert.Equal(10, page.Pins);
        Assert.Equal(1, page.MapCount);
        Assert.Empty(m.K.CheckInvariants());
        var frames = m.K.LiveFrames;
        m.K.Start(m.T, new MunmapOp(a, Pg));
        Assert.Equal(0, page.MapCount);
        Assert.Equal(frames, m.K.LiveFrames);
        foreach (var id in rules)
            Assert.True(m.K.RemoveInjectRule(id));
        Assert.Equal(0, page.Pins);
        Assert.Equal(frames - 1, m.K.LiveFrames);
        Assert.Empty(m.K.CheckInvariants());
    }
}
