<#
.SYNOPSIS
    Open (or close) in Windows Firewall the TCP ports a PC serves to the other PCs.

.DESCRIPTION
    Run in an elevated PowerShell ("Run as administrator") on that PC:

      scripts\firewall.ps1 -Pc pc2            Kafka, Kafka UI, Central (monitors and admin)
      scripts\firewall.ps1 -Pc pc1            driver dashboard
      scripts\firewall.ps1 -Pc pc3            site dashboard
      scripts\firewall.ps1 -Pc pc2 -Remove    delete the rules again

    The ports come from network_config.py (python network_config.py --ports pc2), so an
    overridden port ($env:KAFKA_PORT = "19092") is the one opened. The rules are inbound,
    TCP, for every profile, in the group "EV Charging"; running it again replaces them.
#>
[CmdletBinding()]
param(
    [Parameter(Mandatory = $true)]
    [ValidateSet("pc1", "pc2", "pc3", "all")]
    [string]$Pc,

    [switch]$Remove
)

$ErrorActionPreference = "Stop"
Set-Location (Split-Path -Parent $PSScriptRoot)

$principal = New-Object Security.Principal.WindowsPrincipal([Security.Principal.WindowsIdentity]::GetCurrent())
if (-not $principal.IsInRole([Security.Principal.WindowsBuiltInRole]::Administrator)) {
    Write-Host "firewall: run this in PowerShell opened with 'Run as administrator'" -ForegroundColor Red
    exit 1
}

$py = $null
foreach ($candidate in @(@("py", "-3"), @("python"), @("python3"))) {
    if (Get-Command $candidate[0] -ErrorAction SilentlyContinue) { $py = $candidate; break }
}
if (-not $py) { Write-Host "firewall: Python 3.11 not found (network_config.py has the ports)" -ForegroundColor Red; exit 1 }
$pyArgs = @($py | Select-Object -Skip 1)
$out = & $py[0] @pyArgs network_config.py --ports $Pc
if ($LASTEXITCODE -ne 0) { Write-Host "firewall: network_config.py refused the settings" -ForegroundColor Red; exit 1 }
$ports = @("$out".Trim() -split '\s+')

$group = "EV Charging"
$name = "EV Charging $Pc"
# Replace, never duplicate: drop this PC's earlier rules first.
Get-NetFirewallRule -DisplayName $name -ErrorAction SilentlyContinue | Remove-NetFirewallRule

if ($Remove) {
    Write-Host "firewall: removed the rules '$name'"
    exit 0
}
New-NetFirewallRule -DisplayName $name -Group $group -Direction Inbound -Protocol TCP `
    -LocalPort $ports -Action Allow -Profile Any | Out-Null
Write-Host "firewall: opened inbound TCP $($ports -join ', ') for $Pc (rule '$name')" -ForegroundColor Green
