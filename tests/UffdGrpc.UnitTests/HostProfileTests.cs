using UffdGrpc.Mm;
using UffdGrpc.Scenarios;
using UffdGrpc.Scenarios.Host;

namespace UffdGrpc.UnitTests;

/// <summary>The read-fault zero-page setting and the profile file the model loads (`probe`, `replay --profile-file`).</summary>
public class HostProfileTests
{
    private static async Task<string> ReplayAsync(Kernel k, string script)
    {
        var sw = new StringWriter { NewLine = "\n" };
        await using var b = new InProcessBackend(k);
        await new ScenarioInterpreter(b, sw).RunAsync(new StringReader(script));
        return sw.ToString();
    }

    [Fact]
    public async Task Without_the_read_fault_zero_page_a_read_allocates_a_page_and_a_thp()
    {
        const string script = "map A 1 anon private rw\nthp A off\nread A 0\npagemap A 0 1\nmap T 512 anon private rw\nthp T on\nread T 0\nvmas T\n";
        var on = await ReplayAsync(new Kernel(), script);
        Assert.Contains("pagemap A 0: present zero\n", on, StringComparison.Ordinal);
        Assert.Contains("vma T 0-511 rw-p flags=hg rss=0 swap=0 pmd_mapped=0\n", on, StringComparison.Ordinal);
        var k = new Kernel();
        k.Configure(c => c with { ReadFaultZeroPage = false });
        var off = await ReplayAsync(k, script);
        Assert.Contains("pagemap A 0: present exclusive\n", off, StringComparison.Ordinal);
        Assert.Contains("vma T 0-511 rw-p flags=hg rss=512 swap=0 pmd_mapped=1\n", off, StringComparison.Ordinal);
    }

    [Fact]
    public void A_profile_round_trips_through_json_and_loads_as_its_built_in_profile()
    {
        foreach (var p in new[] { KernelProfile.V6_18, KernelProfile.V6_1, KernelProfile.V5_7 })
        {
            var model = HostProfile.FromModel(p, Kernel.DefaultConfig(p) with { Swap = true, ReadFaultZeroPage = false });
            var back = HostProfile.FromJson(model.ToJson());
            Assert.Empty(back.Compare(model));
            var k = back.ToKernel(out var error);
            Assert.True(k is not null, error);
            Assert.Equal(p, k!.Profile);
            Assert.True(k.Config.Swap);
            Assert.False(k.Config.ReadFaultZeroPage);
        }
    }

    [Fact]
    public void A_profile_no_built_in_profile_has_is_refused_with_the_differences()
    {
        var model = HostProfile.FromModel(KernelProfile.V6_18) with { UffdApiFeatures = "0x3ffff" };
        Assert.Null(model.ToKernel(out var error));
        Assert.Contains("6.18: uffd_api_features is 0x3ffff, the profile's 0x1ffff", error, StringComparison.Ordinal);
        var regs = new SortedDictionary<string, string>(model.RegisterIoctls, StringComparer.Ordinal) { ["anon.minor"] = "ok ioctls=WAKE" };
        Assert.Contains(HostProfile.FromModel(KernelProfile.V6_18) with { RegisterIoctls = regs } is var m ? m.Compare(HostProfile.FromModel(KernelProfile.V6_18)) : [], d => d.Field == "register_ioctls.anon.minor" && !d.Machine);
    }
}
