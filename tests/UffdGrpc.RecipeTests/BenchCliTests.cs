using System.Globalization;
using System.Text.RegularExpressions;
using Xunit.Abstractions;

namespace UffdGrpc.RecipeTests;

/// <summary>
/// The bench command runs end to end (its quick form, the batched and memory parts): both
/// servers start, every row prints a figure, an anchor and a ratio. Figures are not judged
/// here (timings belong to the bench, not to tests); a row that stops printing is.
/// </summary>
public sealed partial class BenchCliTests(ITestOutputHelper output)
{
    [GeneratedRegex(@"^\| (?<op>[^|]+) \| (?<fig>[0-9.]+)(?<k>k?)[^|]* \| (?<anchor>[^|]+) \| (?<ratio>[^|]+) \|", RegexOptions.Multiline)]
    private static partial Regex Row();

    [Fact]
    public async Task Quick_bench_prints_the_batched_rows_with_the_server_cpu_and_the_memory_rows()
    {
        var (rc, text) = await BuiltCli.RunAsync(output, TimeSpan.FromSeconds(300), "bench", "--quick", "--only", "batch,memory");

        Assert.True(rc == 0, text);
        var rows = Row().Matches(text).ToDictionary(m => m.Groups["op"].Value.Trim(), m => m);
        double Figure(string prefix)
        {
            var m = rows.First(r => r.Key.StartsWith(prefix, StringComparison.Ordinal)).Value;
            return double.Parse(m.Groups["fig"].Value, CultureInfo.InvariantCulture) * (m.Groups["k"].Value == "k" ? 1000 : 1);
        }
        Assert.True(Figure("resolved faults/s, median of 3 runs alternating with the floor's") > 0);
        Assert.True(Figure("server CPU per resolved fault") > 0);
        Assert.True(Figure("the same in-process") > 0);
        Assert.True(Figure("metadata per resident page") > 0);
        Assert.Contains(">= 0.53 (500k/s at a 950k/s floor)", text, StringComparison.Ordinal);
        Assert.All(rows.Where(r => r.Key.StartsWith("resolved", StringComparison.Ordinal) || r.Key.StartsWith("server CPU", StringComparison.Ordinal)),
            r => Assert.Contains("(floor)", r.Value.Groups["anchor"].Value, StringComparison.Ordinal));
    }
}
