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

/// <summary>UFFDIO_COPY from a fill buffer: no buffer is materialised, whatever its length.</summary>
public sealed class CopyFillTests
{
    [Fact]
    public void A_refused_64_MiB_fill_copy_allocates_nothing_and_a_valid_one_copies_the_fill()
    {
        var m = new Machine();
        var a = m.Map(16);
        var ctx = m.Uffd();
        const ulong big = 64UL << 20;
        var before = GC.GetAllocatedBytesForCurrentThread();
        var refused = ctx.CopyFill(a, 0x11, big, 0x7f00_0000_0000, big, 0);
        var allocated = GC.GetAllocatedBytesForCurrentThread() - before;
        Assert.Equal(Errno.ENOENT, refused.Errno);
        Assert.True(allocated < 64 << 10, $"a refused fill copy allocated {allocated} bytes");

        Assert.Equal(Errno.OK, ctx.Register(a, 16 * Machine.Pg, Uapi.RegisterModeMissing, out _));
        var ok = ctx.CopyFill(a, 0x22, 16 * Machine.Pg, 0x7f00_0000_0000, 16 * Machine.Pg, 0);
        Assert.Equal((Errno.OK, (long?)(16 * (long)Machine.Pg)), (ok.Errno, ok.Field));
        Assert.All(m.Read(a, count: 16).Values, v => Assert.Equal(0x22, v));
        var offTheEnd = ctx.CopyFill(a, 0x33, Machine.Pg, 0x7f00_0000_0000, 2 * Machine.Pg, 0);
        Assert.Equal(Errno.EFAULT, offTheEnd.Errno);
    }
}
