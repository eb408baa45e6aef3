using System.Globalization;

namespace UffdGrpc.Server.Mapping;

/// <summary>
/// List pagination: items in id order, <c>page_size</c> at a time (0 → <see cref="DefaultSize"/>,
/// at most <see cref="MaxSize"/>), the page token being the last id of the previous page.
/// </summary>
public static class Paging
{
    public const int DefaultSize = 100;
    public const int MaxSize = 1000;

    /// <summary>The page of <paramref name="items"/> (ordered by id) after <paramref name="token"/>, and the next token ("" on the last page).</summary>
    public static (List<T> Page, string Next) Take<T>(IEnumerable<T> items, Func<T, long> id, int pageSize, string token)
    {
        RequestErrors.Require(pageSize is >= 0 and <= MaxSize, "page_size", $"0 (the default, {DefaultSize}) to {MaxSize}");
        long after = 0;
        if (token.Length > 0 && (!long.TryParse(token, NumberStyles.None, CultureInfo.InvariantCulture, out after) || after <= 0))
            throw RequestErrors.Invalid("page_token", "not a token this list returned");
        var size = pageSize == 0 ? DefaultSize : pageSize;
        var page = items.Where(i => id(i) > after).Take(size + 1).ToList();
        if (page.Count <= size)
            return (page, "");
        page.RemoveAt(size);
        return (page, id(page[^1]).ToString(CultureInfo.InvariantCulture));
    }
}
