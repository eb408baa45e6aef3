using UffdGrpc.Mm;

namespace UffdGrpc.UnitTests;

/// <summary>Syscall arguments at the edges of the 64-bit range, as mm/mmap.c and mm/vma.c check them.</summary>
public sealed class ArgumentEdgeTests
{
    private const ulong A = 0x7e00_0000_0000;

    [Theory]
    [InlineData(ulong.MaxValue)]
    [InlineData(ulong.MaxValue - 4094)]
    public void Mmap_of_a_length_that_page_aligns_to_zero_is_ENOMEM_and_maps_nothing(ulong len)
    {
        var m = new Machine();
        Assert.Equal(Errno.ENOMEM, m.Mm.Mmap(A, len, Prot.Read | Prot.Write, false, null, 0));
        Assert.Empty(m.Mm.Vmas);
    }

    [Theory]
    [InlineData(ulong.MaxValue)]
    [InlineData(0UL)]
    public void Munmap_of_a_length_past_TASK_SIZE_or_zero_is_EINVAL_and_unmaps_nothing(ulong len)
    {
        var m = new Machine();
        var a = m.Map(1);
        var op = new MunmapOp(a, len);
        m.K.Start(m.T, op);
        Assert.Equal(Errno.EINVAL, op.Result);
        Assert.Single(m.Mm.Vmas);
    }

    [Fact]
    public void A_write_reports_the_byte_it_wrote_on_each_page()
    {
        var m = new Machine();
        var a = m.Map(3);
        var op = m.Write(a, 0x5a, count: 3);
        Assert.Equal([0x5a, 0x5a, 0x5a], op.Values);
        Assert.Equal([0x5a, 0x5a, 0x5a], m.Read(a, count: 3).Values);
    }
}
