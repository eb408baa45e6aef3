namespace UffdGrpc.ContractTests;

/// <summary>The server process refuses a configuration it cannot start with: one line naming the key and the value, exit status 2.</summary>
public sealed class ConfigurationTests
{
    public static TheoryData<string, string, string> BadValues => new()
    {
        { "Limits__MachinesPerPrincipal", "0", "Limits:MachinesPerPrincipal = '0': must be a positive integer" },
        { "Limits__ThreadsPerMachine", "lots", "'lots' at 'Limits:ThreadsPerMachine'" },
        { "Server__DefaultProfile", "4.19", "Server:DefaultProfile = '4.19': must be 6.18, 6.1 or v5.7" },
        { "Auth__Anonymous", "Sometimes", "'Sometimes' at 'Auth:Anonymous'" },
        { "Limits__MachinesPerPrincpal", "3", "Limits has no key MachinesPerPrincpal" },
        { "Metrics__OtlpEndpoint", "collector", "Metrics:OtlpEndpoint = 'collector'" },
        { "Metrics__ListenUrl", "9464", "Metrics:ListenUrl = '9464'" },
        { "Watchdog__UserfaultSeconds", "-1", "Watchdog:UserfaultSeconds = '-1': must be 0 (off) or a positive number of seconds" },
        { "Limits__JournalBytesPerMachine", "0", "Limits:JournalBytesPerMachine = '0': must be a positive integer" },
    };

    [Theory]
    [MemberData(nameof(BadValues))]
    public async Task A_bad_value_stops_the_server_with_a_message_naming_the_key_and_value_and_exit_status_2(string key, string value, string message)
    {
        // Act
        var (code, stderr, stdout) = await ServerProcess.RunToExitAsync(new Dictionary<string, string> { [key] = value }, ["--urls", "http://127.0.0.1:0"], TimeSpan.FromSeconds(60));

        // Assert
        Assert.Equal(2, code);
        var line = Assert.Single(stderr.Split('\n', StringSplitOptions.RemoveEmptyEntries));
        Assert.StartsWith("uffdgrpc-server: invalid configuration: ", line, StringComparison.Ordinal);
        Assert.Contains(message, line, StringComparison.Ordinal);
        Assert.DoesNotContain("Now listening", stdout, StringComparison.Ordinal);
    }

    [Fact]
    public async Task A_listen_url_that_is_not_a_url_is_named_too()
    {
        var (code, stderr, _) = await ServerProcess.RunToExitAsync(new Dictionary<string, string>(), ["--urls", "localhost-5051"], TimeSpan.FromSeconds(60));

        Assert.Equal(2, code);
        Assert.Contains("urls = 'localhost-5051'", stderr, StringComparison.Ordinal);
    }

    [Fact]
    public async Task A_token_too_short_is_named_by_its_principal_and_never_printed()
    {
        var (code, stderr, _) = await ServerProcess.RunToExitAsync(new Dictionary<string, string> { ["Auth__Tokens__bob"] = "hunter2" }, ["--urls", "http://127.0.0.1:0"], TimeSpan.FromSeconds(60));

        Assert.Equal(2, code);
        Assert.Contains("Auth:Tokens:bob = <7 characters>", stderr, StringComparison.Ordinal);
        Assert.DoesNotContain("hunter2", stderr, StringComparison.Ordinal);
    }

    [Fact]
    public async Task Server_DefaultProfile_is_the_profile_of_a_machine_created_without_one()
    {
        await using var server = await ServerProcess.StartAsync(new Dictionary<string, string> { ["Server__DefaultProfile"] = "v5.7" });
        using var c = new UffdClient(server.Address);

        var unspecified = await c.CreateMachineAsync();
        var explicitly = await c.CreateMachineAsync(KernelProfile.V618);

        Assert.Equal(KernelProfile.V57, unspecified.Profile);
        Assert.Equal(KernelProfile.V618, explicitly.Profile);
    }

    [Fact]
    public async Task Metrics_ListenUrl_adds_an_http1_scrape_endpoint_beside_the_h2c_grpc_endpoint()
    {
        await using var server = await ServerProcess.StartAsync(new Dictionary<string, string> { ["Metrics__ListenUrl"] = "http://127.0.0.1:0" });
        using var c = new UffdClient(server.Address);
        await c.CreateMachineAsync();
        await EventuallyAsync(() => Task.FromResult(server.Listening.Count == 2), "both endpoints listen");
        var scrape = server.Listening.Single(a => a != server.Address);

        using var http = new HttpClient { DefaultRequestVersion = System.Net.HttpVersion.Version11, DefaultVersionPolicy = HttpVersionPolicy.RequestVersionExact };
        var r = await http.GetAsync(new Uri(scrape + "/metrics"));
        var text = new PrometheusText(await r.Content.ReadAsStringAsync());

        Assert.Equal(System.Net.HttpVersion.Version11, r.Version);
        Assert.Equal(1, text.Sum("uffdgrpc_rpc_calls_total", ("rpc_method", "CreateMachine"), ("rpc_grpc_status", "OK")));
    }
}
