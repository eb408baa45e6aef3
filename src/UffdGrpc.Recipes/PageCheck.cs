using UffdGrpc.Client;
using UffdGrpc.Contracts.V1;

namespace UffdGrpc.Recipes;

/// <summary>One page as a read would see it: its state and the SHA-256 of its contents.</summary>
public readonly record struct PageImage(PageState State, byte[] Sha256)
{
    public bool SameBytes(PageImage other) => Sha256.AsSpan().SequenceEqual(other.Sha256);
    public string Short => Sha256.Length == 0 ? "(no contents)" : Convert.ToHexStringLower(Sha256)[..12];
}

/// <summary>
/// The byte-for-byte checks of the recipes, over the server's side-effect-free per-page
/// digests (MmService.Digest: what a read of each page would observe), so comparing two
/// address spaces moves no page bytes and disturbs nothing.
/// </summary>
public static class PageCheck
{
    public const ulong PageSize = 4096;

    /// <summary>The pages of [<paramref name="start"/>, +<paramref name="pages"/>) of <paramref name="mmId"/>.</summary>
    public static async Task<PageImage[]> ImagesAsync(UffdClient client, long mmId, ulong start, int pages, CancellationToken ct)
    {
        var all = new PageImage[pages];
        for (var off = 0; off < pages; off += 65536)
        {
            var n = Math.Min(65536, pages - off);
            var d = await client.DigestAsync(mmId, start + ((ulong)off * PageSize), (uint)n, ct).ConfigureAwait(false);
            for (var i = 0; i < n; i++)
                all[off + i] = new PageImage(d[i].State, d[i].Sha256.ToByteArray());
        }
        return all;
    }

    /// <summary>SHA-256 of a page of <paramref name="bytes"/> (what Digest reports for it).</summary>
    public static byte[] Sha(ReadOnlySpan<byte> bytes) => System.Security.Cryptography.SHA256.HashData(bytes);

    /// <summary>
    /// Compares <paramref name="actual"/> with <paramref name="expected"/> page by page;
    /// with <paramref name="requirePresent"/> a page the actual side does not hold (not
    /// present: a read would fault) differs even when zeros were expected.
    /// </summary>
    public static RecipeCheck Compare(string what, ulong start, IReadOnlyList<PageImage> expected, IReadOnlyList<PageImage> actual, bool requirePresent = false)
    {
        var differing = 0;
        var first = -1;
        for (var i = 0; i < expected.Count; i++)
        {
            var bad = !expected[i].SameBytes(actual[i]) || (requirePresent && actual[i].State != PageState.Present);
            if (bad)
            {
                differing++;
                if (first < 0)
                    first = i;
            }
        }
        if (first < 0)
            return RecipeCheck.Pass($"{what}: {expected.Count} pages equal byte for byte");
        var e = expected[first];
        var a = actual[first];
        return RecipeCheck.Fail($"{what}: {differing} of {expected.Count} pages differ; first: page {first} (0x{start + ((ulong)first * PageSize):x}): expected {e.Short} ({Name(e.State)}), found {a.Short} ({Name(a.State)})");
    }

    private static string Name(PageState s) => s switch
    {
        PageState.Present => "present",
        PageState.NotPresent => "not present",
        PageState.Swapped => "swapped",
        PageState.PageCache => "page cache",
        _ => s.ToString().ToLowerInvariant(),
    };
}
