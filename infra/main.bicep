// patient-journey: the production storage account, its four zone containers and their role assignments.
//
// Deploy into an existing resource group:
//   az deployment group create -g RG -f infra/main.bicep -p @infra/main.parameters.json
// See infra/README.md for the parameters and docs/deployment.md for pointing the flows at the account.
//
// Zones (one container each; the names are fixed because the settings and docs refer to them):
//   landing    raw PHI as received: FHIR $export target, IoT Hub routing target, outcome drops
//   restricted bronze, staged tables, identity crosswalk, held records, ledgers (PHI)
//   quarantine rejected records: the rule broken and the lineage, never the values
//   warehouse  silver and gold Delta tables: pseudonymous; the only container analysts can read

targetScope = 'resourceGroup'

// ---------------------------------------------------------------------------------------------
// Parameters
// ---------------------------------------------------------------------------------------------

@description('Storage account name: 3-24 lowercase letters and digits, globally unique.')
@minLength(3)
@maxLength(24)
param storageAccountName string = 'pj${uniqueString(resourceGroup().id)}'

@description('Azure region of the account.')
param location string = resourceGroup().location

@description('Redundancy. ZRS keeps PHI available through a zone outage; use LRS for dev, GZRS/RAGZRS where a second region is required (and allowed by your data-residency rules).')
@allowed([
  'Standard_LRS'
  'Standard_ZRS'
  'Standard_GRS'
  'Standard_RAGRS'
  'Standard_GZRS'
  'Standard_RAGZRS'
])
param skuName string = 'Standard_ZRS'

@description('Days that deleted blobs and deleted containers stay recoverable (blob and container soft delete).')
@minValue(1)
@maxValue(365)
param softDeleteRetentionDays int = 14

@description('Record every blob change in the change feed (for audit or event-driven consumers). Off by default.')
param enableChangeFeed bool = false

@description('Days the change feed is kept when it is enabled.')
@minValue(1)
@maxValue(146000)
param changeFeedRetentionDays int = 90

@description('Allow Shared Key authorization (account keys, connection strings and account-key SAS). Keep false in production: the flows use Microsoft Entra ID. Set true only for a dev account used with JOURNEY_AZURE__AUTH=connection_string, account_key or sas.')
param allowSharedKeyAccess bool = false

@description('Public network access to the account. Disabled = reachable only through private endpoints (not created by this template).')
@allowed([
  'Enabled'
  'Disabled'
])
param publicNetworkAccess string = 'Enabled'

@description('Firewall default when public network access is Enabled. Deny = only the IP ranges and subnets below, plus trusted Azure services (IoT Hub, FHIR service) using their managed identities.')
@allowed([
  'Allow'
  'Deny'
])
param networkDefaultAction string = 'Allow'

@description('Public IPv4 addresses or CIDR ranges allowed through the firewall when networkDefaultAction is Deny, e.g. the Prefect worker\'s egress IP. Azure accepts single addresses and prefixes up to /30 (write a single address without /32), public ranges only.')
param allowedIpRanges array = []

@description('Resource ids of virtual-network subnets (with the Microsoft.Storage service endpoint) allowed through the firewall when networkDefaultAction is Deny.')
param allowedSubnetIds array = []

@description('Move blobs in the landing container to the Cool tier this many days after they were last modified; 0 = no such rule. Cool blobs stay online (a rebuild can still read them) at a higher read price.')
@minValue(0)
param landingCoolAfterDays int = 0

@description('Delete previous blob versions older than this many days (lifecycle rule on versions, daysAfterCreationGreaterThan), in every container; 0 = keep them forever. Versioning is account-wide, so Delta checkpoint overwrites and VACUUM deletions in restricted and warehouse also leave previous versions behind: without this rule they are billed indefinitely and erased data stays recoverable. Deleted versions then stay soft-deleted for softDeleteRetentionDays.')
@minValue(0)
param previousVersionDeleteAfterDays int = 30

@description('Object (principal) id of the Prefect worker\'s identity (managed identity or workload identity); gets Storage Blob Data Contributor on all four containers.')
@minLength(36)
@maxLength(36)
param pipelinePrincipalId string

@description('Kind of the pipeline principal: ServicePrincipal for a managed or workload identity, User to let a developer run the flows with az login.')
@allowed([
  'ServicePrincipal'
  'User'
  'Group'
])
param pipelinePrincipalType string = 'ServicePrincipal'

@description('Optional object id (usually an Entra group) that gets Storage Blob Data Reader on the warehouse container only. Empty = no analyst access.')
param analystsPrincipalId string = ''

@description('Kind of the analysts principal.')
@allowed([
  'ServicePrincipal'
  'User'
  'Group'
])
param analystsPrincipalType string = 'Group'

@description('Optional object id of the IoT Hub\'s managed identity (identity-based routing endpoint); gets Storage Blob Data Contributor on landing only. Empty = none.')
param iotHubPrincipalId string = ''

@description('Optional object id of the FHIR service\'s managed identity ($export destination); gets Storage Blob Data Contributor on landing only. Empty = none.')
param fhirServicePrincipalId string = ''

@description('Tags applied to the storage account.')
param tags object = {}

// ---------------------------------------------------------------------------------------------
// Constants
// ---------------------------------------------------------------------------------------------

// Built-in role definitions (the same GUIDs in every tenant).
var storageBlobDataContributor = 'ba92f5b4-2d11-453d-a403-e96b0029c9fe'
var storageBlobDataReader = '2a2b9908-6ea1-4ae2-8e65-a410df84e7d1'

var zoneContainerNames = [
  'landing'
  'restricted'
  'quarantine'
  'warehouse'
]

var landingCoolRules = (landingCoolAfterDays > 0) ? [
  {
    name: 'landing-to-cool'
    enabled: true
    type: 'Lifecycle'
    definition: {
      filters: {
        blobTypes: [
          'blockBlob'
        ]
        prefixMatch: [
          'landing/'
        ]
      }
      actions: {
        baseBlob: {
          tierToCool: {
            daysAfterModificationGreaterThan: landingCoolAfterDays
          }
        }
      }
    }
  }
] : []

var previousVersionRules = (previousVersionDeleteAfterDays > 0) ? [
  {
    name: 'delete-previous-versions'
    enabled: true
    type: 'Lifecycle'
    definition: {
      filters: {
        blobTypes: [
          'blockBlob'
        ]
      }
      actions: {
        version: {
          delete: {
            daysAfterCreationGreaterThan: previousVersionDeleteAfterDays
          }
        }
      }
    }
  }
] : []

var lifecycleRules = concat(landingCoolRules, previousVersionRules)

// ---------------------------------------------------------------------------------------------
// Storage account
// ---------------------------------------------------------------------------------------------

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  // Deliberate choices that checkov's Azure rules would otherwise flag (see infra/README.md):
  // checkov:skip=CKV_AZURE_43:the default name is 'pj' + uniqueString(), which checkov cannot evaluate
  // checkov:skip=CKV_AZURE_206:ZRS by default; geo-redundancy (skuName GZRS) is a data-residency decision
  // checkov:skip=CKV_AZURE_35:the firewall default is the networkDefaultAction parameter; set Deny in production
  // checkov:skip=CKV_AZURE_59:publicNetworkAccess is a parameter; Disabled needs private endpoints
  name: storageAccountName
  location: location
  tags: tags
  kind: 'StorageV2'
  sku: {
    name: skuName
  }
  properties: {
    // Hierarchical namespace OFF: a plain Blob account, not ADLS Gen2.
    // - delta-rs (object_store) and fsspec work with both; the flows use az://<container>/<path>
    //   URLs over the Blob endpoint, and delta-rs commits with conditional puts, so nothing needs
    //   the atomic directory rename that only HNS offers.
    // - IoT Hub routing and the FHIR service $export both write to a plain Blob account.
    // - Blob versioning, which landing needs, is documented as not supported on accounts with a
    //   hierarchical namespace.
    // - A flat account can be upgraded to HNS in place later; an HNS account can never go back.
    isHnsEnabled: false
    accessTier: 'Hot'
    minimumTlsVersion: 'TLS1_2'
    supportsHttpsTrafficOnly: true
    allowBlobPublicAccess: false
    allowSharedKeyAccess: allowSharedKeyAccess
    // The portal and tools default to Entra ID rather than keys.
    defaultToOAuthAuthentication: true
    // PHI stays in this tenant: no object replication to accounts in other tenants.
    allowCrossTenantReplication: false
    publicNetworkAccess: publicNetworkAccess
    networkAcls: {
      // Trusted Azure services (IoT Hub routing, the FHIR service $export) authenticate with
      // their managed identities and pass the firewall when defaultAction is Deny.
      bypass: 'AzureServices'
      defaultAction: networkDefaultAction
      ipRules: [for ip in allowedIpRanges: {
        value: ip
        action: 'Allow'
      }]
      virtualNetworkRules: [for subnetId in allowedSubnetIds: {
        id: subnetId
        action: 'Allow'
      }]
    }
    encryption: {
      keySource: 'Microsoft.Storage'
      services: {
        blob: {
          enabled: true
          keyType: 'Account'
        }
      }
    }
  }
}

resource blobService 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' = {
  parent: storage
  name: 'default'
  properties: {
    // Versioning is a blob-service (account-wide) setting in Azure: it cannot be switched on for
    // landing alone. It protects landing's raw files against overwrite; in the other containers
    // it leaves previous versions of overwritten or vacuumed Delta files, which the
    // 'delete-previous-versions' lifecycle rule (previousVersionDeleteAfterDays) removes.
    isVersioningEnabled: true
    deleteRetentionPolicy: {
      enabled: true
      days: softDeleteRetentionDays
    }
    containerDeleteRetentionPolicy: {
      enabled: true
      days: softDeleteRetentionDays
    }
    changeFeed: enableChangeFeed ? {
      enabled: true
      retentionInDays: changeFeedRetentionDays
    } : {
      enabled: false
    }
  }
}

resource zoneContainers 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = [for zone in zoneContainerNames: {
  parent: blobService
  name: zone
  properties: {
    publicAccess: 'None'
    metadata: {
      zone: zone
      pseudonymous: zone == 'warehouse' ? 'true' : 'false'
    }
  }
}]

resource lifecycle 'Microsoft.Storage/storageAccounts/managementPolicies@2023-05-01' = if (!empty(lifecycleRules)) {
  parent: storage
  name: 'default'
  properties: {
    policy: {
      rules: lifecycleRules
    }
  }
  dependsOn: [
    blobService
  ]
}

// ---------------------------------------------------------------------------------------------
// Role assignments, each scoped to one container
// ---------------------------------------------------------------------------------------------

// The Prefect worker reads landing and writes restricted, quarantine and warehouse.
module pipelineAccess 'modules/container-role-assignment.bicep' = [for (zone, i) in zoneContainerNames: {
  name: 'rbac-pipeline-${zone}-${uniqueString(storage.id)}'
  params: {
    storageAccountName: storage.name
    containerName: zoneContainers[i].name
    principalId: pipelinePrincipalId
    principalType: pipelinePrincipalType
    roleDefinitionGuid: storageBlobDataContributor
    assignmentDescription: 'patient-journey pipeline: read and write the ${zone} zone'
  }
}]

// Analysts read the pseudonymous warehouse and nothing else.
module analystsAccess 'modules/container-role-assignment.bicep' = if (!empty(analystsPrincipalId)) {
  name: 'rbac-analysts-warehouse-${uniqueString(storage.id)}'
  params: {
    storageAccountName: storage.name
    containerName: zoneContainers[3].name
    principalId: analystsPrincipalId
    principalType: analystsPrincipalType
    roleDefinitionGuid: storageBlobDataReader
    assignmentDescription: 'patient-journey analysts: read the pseudonymous warehouse'
  }
}

// IoT Hub message routing writes device telemetry into landing.
module iotHubAccess 'modules/container-role-assignment.bicep' = if (!empty(iotHubPrincipalId)) {
  name: 'rbac-iothub-landing-${uniqueString(storage.id)}'
  params: {
    storageAccountName: storage.name
    containerName: zoneContainers[0].name
    principalId: iotHubPrincipalId
    principalType: 'ServicePrincipal'
    roleDefinitionGuid: storageBlobDataContributor
    assignmentDescription: 'IoT Hub routing endpoint: write telemetry into landing'
  }
}

// The FHIR service writes $export output into landing.
module fhirServiceAccess 'modules/container-role-assignment.bicep' = if (!empty(fhirServicePrincipalId)) {
  name: 'rbac-fhir-landing-${uniqueString(storage.id)}'
  params: {
    storageAccountName: storage.name
    containerName: zoneContainers[0].name
    principalId: fhirServicePrincipalId
    principalType: 'ServicePrincipal'
    roleDefinitionGuid: storageBlobDataContributor
    assignmentDescription: 'FHIR service $export: write bulk exports into landing'
  }
}

// ---------------------------------------------------------------------------------------------
// Outputs: what the settings need (see docs/deployment.md)
// ---------------------------------------------------------------------------------------------

output storageAccountName string = storage.name
output blobEndpoint string = storage.properties.primaryEndpoints.blob

output landingUrl string = 'az://${zoneContainers[0].name}'
output restrictedUrl string = 'az://${zoneContainers[1].name}'
output quarantineUrl string = 'az://${zoneContainers[2].name}'
output warehouseUrl string = 'az://${zoneContainers[3].name}'

@description('The non-secret settings of the Prefect worker, ready to export as environment variables.')
output journeySettings object = {
  JOURNEY_AZURE__ACCOUNT_NAME: storage.name
  JOURNEY_AZURE__AUTH: 'entra'
  JOURNEY_STORAGE__LANDING_URL: 'az://${zoneContainers[0].name}'
  JOURNEY_STORAGE__RESTRICTED_URL: 'az://${zoneContainers[1].name}'
  JOURNEY_STORAGE__QUARANTINE_URL: 'az://${zoneContainers[2].name}'
  JOURNEY_STORAGE__WAREHOUSE_URL: 'az://${zoneContainers[3].name}'
}
