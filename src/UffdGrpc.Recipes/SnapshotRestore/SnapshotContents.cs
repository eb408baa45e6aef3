using System.Buffers.Binary;

namespace UffdGrpc.Recipes.SnapshotRestore;

/// <summary>Seeded memory contents of a VM at snapshot (or dump) time: runs of all-zero pages (the known-zero pages a restore can skip) between pages holding a recognisable per-page pattern.</summary>
public static class SnapshotContents
{
    /// <summary><paramref name="pages"/> pages; one run of 8 pages in every <paramref name="period"/> is zero (the last).</summary>
    public static byte[] Create(int pages, ulong seed, int period = 4)
    {
        var data = new byte[pages * (int)PageCheck.PageSize];
        var rng = new Random(unchecked((int)seed));
        for (var p = 0; p < pages; p++)
        {
            if (IsZero(p, period))
                continue;
            var page = data.AsSpan(p * (int)PageCheck.PageSize, (int)PageCheck.PageSize);
            rng.NextBytes(page[..32]);
            BinaryPrimitives.WriteInt32LittleEndian(page[32..], p);
            for (var i = 36; i < page.Length; i++)
                page[i] = (byte)((p * 7) + i);
        }
        return data;
    }

    /// <summary>Whether page <paramref name="p"/> is all zero.</summary>
    public static bool IsZero(int p, int period = 4) => p / 8 % period == period - 1;
}
