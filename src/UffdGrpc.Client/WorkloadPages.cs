namespace UffdGrpc.Client;

/// <summary>
/// The page a guest workload writes (uffd.v1.WorkloadSpec's byte layout), for checkers:
/// build the expected bytes of a (page, generation) from the write record, or read which
/// write a page holds.
/// </summary>
public static class WorkloadPages
{
    /// <summary>The 4096 bytes a workload writes to <paramref name="address"/> at <paramref name="generation"/>.</summary>
    public static byte[] Expected(ulong address, ulong generation)
    {
        var page = new byte[GuestPagePattern.PageSize];
        GuestPagePattern.Fill(page, address, generation);
        return page;
    }

    /// <summary>Fills <paramref name="page"/> (4096 bytes) as a workload write of <paramref name="address"/> at <paramref name="generation"/>.</summary>
    public static void Fill(Span<byte> page, ulong address, ulong generation) => GuestPagePattern.Fill(page, address, generation);

    /// <summary>Whether <paramref name="page"/> holds a whole workload write, and which (its address and generation).</summary>
    public static bool TryRead(ReadOnlySpan<byte> page, out ulong address, out ulong generation) =>
        GuestPagePattern.TryRead(page, out address, out generation);
}
