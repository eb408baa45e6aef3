using UffdGrpc.Client;
using UffdGrpc.Contracts.V1;

namespace UffdGrpc.Recipes.RestoreCommon;

/// <summary>The outcome of a byte-for-byte check: which pages of which range differ from the reference.</summary>
public sealed record PageCheckResult(string What, long PagesCompared, IReadOnlyList<ulong> Mismatches)
{
    public bool Passed => Mismatches.Count == 0;

    public override string ToString() => Passed
        ? $"{What}: PASS ({PagesCompared} pages byte-identical)"
        : $"{What}: FAIL ({Mismatches.Count} of {PagesCompared} pages differ; first at {string.Join(", ", Mismatches.Take(4).Select(a => "0x" + a.ToString("x", System.Globalization.CultureInfo.InvariantCulture)))})";
}

/// <summary>Compares two address spaces page by page through the server's side-effect-free digests (what a read of each page would observe).</summary>
public static class PageCheck
{
    /// <summary>Every page of <paramref name="ranges"/> in <paramref name="mm"/> against the same page of <paramref name="reference"/>.</summary>
    public static async Task<PageCheckResult> CompareAsync(UffdClient client, string what, long mm, long reference, IEnumerable<(ulong Start, ulong End)> ranges, CancellationToken ct)
    {
        var bad = new List<ulong>();
        long n = 0;
        foreach (var (start, end) in ranges)
        {
            for (var at = start; at < end;)
            {
                var pages = (uint)Math.Min((end - at) / 4096, 65536);
                var a = await client.DigestAsync(mm, at, pages, ct).ConfigureAwait(false);
                var b = await client.DigestAsync(reference, at, pages, ct).ConfigureAwait(false);
                for (var i = 0; i < pages; i++)
                {
                    if (!Same(a[i], b[i]))
                        bad.Add(at + (ulong)i * 4096);
                }
                n += pages;
                at += pages * 4096UL;
            }
        }
        return new PageCheckResult(what, n, bad);
    }

    /// <summary>Equal contents: an unmapped page only equals an unmapped page; a missing page reads as zeros like the zero page.</summary>
    private static bool Same(PageDigest a, PageDigest b)
    {
        if (a.State is PageState.Unmapped || b.State is PageState.Unmapped)
            return a.State == b.State;
        return a.Sha256.Equals(b.Sha256);
    }

    /// <summary>The VMAs of <paramref name="mm"/> as (start, end) ranges.</summary>
    public static async Task<IReadOnlyList<(ulong Start, ulong End)>> VmaRangesAsync(UffdClient client, long mm, CancellationToken ct) =>
        (await client.ListVmasAsync(mm, ct).ConfigureAwait(false)).Select(v => (v.Start, v.End)).ToList();
}
