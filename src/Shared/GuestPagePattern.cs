using System.Buffers.Binary;

namespace UffdGrpc;

/// <summary>
/// The bytes a guest workload writes to a page (uffd.v1.WorkloadSpec): bytes 0..7 the page's
/// address, 8..15 its generation, then words j = 2..511 = mix(address, generation) + j·φ
/// (little-endian), so a checker can tell which write a page holds, and stale from fresh.
/// Linked into the model (which writes it) and the client SDK (which checks it).
/// </summary>
internal static class GuestPagePattern
{
    public const int PageSize = 4096;
    private const ulong Phi = 0x9E37_79B9_7F4A_7C15;

    /// <summary>SplitMix64's finaliser of (address ^ generation · 0xD1B54A32D192ED03).</summary>
    public static ulong Mix(ulong address, ulong generation)
    {
        var z = address ^ (generation * 0xD1B5_4A32_D192_ED03);
        z = (z ^ (z >> 30)) * 0xBF58_476D_1CE4_E5B9;
        z = (z ^ (z >> 27)) * 0x94D0_49BB_1331_11EB;
        return z ^ (z >> 31);
    }

    /// <summary>Fills <paramref name="page"/> (4096 bytes) with the pattern of <paramref name="address"/> at <paramref name="generation"/>.</summary>
    public static void Fill(Span<byte> page, ulong address, ulong generation)
    {
        if (page.Length != PageSize)
            throw new ArgumentException("a page is 4096 bytes", nameof(page));
        BinaryPrimitives.WriteUInt64LittleEndian(page, address);
        BinaryPrimitives.WriteUInt64LittleEndian(page[8..], generation);
        var m = Mix(address, generation);
        for (var j = 2; j < PageSize / 8; j++)
            BinaryPrimitives.WriteUInt64LittleEndian(page[(j * 8)..], m + ((ulong)j * Phi));
    }

    /// <summary>
    /// Whether <paramref name="page"/> holds a complete pattern, and which: its address and
    /// generation (false for a page no workload wrote whole, or one changed since).
    /// </summary>
    public static bool TryRead(ReadOnlySpan<byte> page, out ulong address, out ulong generation)
    {
        address = 0;
        generation = 0;
        if (page.Length != PageSize)
            return false;
        var a = BinaryPrimitives.ReadUInt64LittleEndian(page);
        var g = BinaryPrimitives.ReadUInt64LittleEndian(page[8..]);
        var m = Mix(a, g);
        for (var j = 2; j < PageSize / 8; j++)
        {
            if (BinaryPrimitives.ReadUInt64LittleEndian(page[(j * 8)..]) != m + ((ulong)j * Phi))
                return false;
        }
        address = a;
        generation = g;
        return true;
    }
}
