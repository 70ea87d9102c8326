// One Azure RBAC role assignment scoped to one blob container (not to the whole account).
//
// Used by main.bicep for every grant, so that each principal reaches only the zones it needs:
// a Storage Blob Data Reader on `warehouse` cannot list or read `restricted`.

@description('Name of the existing storage account that holds the container.')
param storageAccountName string

@description('Name of the existing blob container that is the scope of the assignment.')
param containerName string

@description('Object (principal) id of the identity that receives the role.')
param principalId string

@description('Kind of principal; set it so that ARM does not have to look the principal up (avoids failures right after an identity is created).')
@allowed([
  'ServicePrincipal'
  'User'
  'Group'
])
param principalType string

@description('GUID of the built-in role definition to assign.')
param roleDefinitionGuid string

@description('Free-text description stored on the role assignment.')
param assignmentDescription string = ''

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: storageAccountName
}

resource blobService 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' existing = {
  parent: storage
  name: 'default'
}

resource container 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' existing = {
  parent: blobService
  name: containerName
}

resource assignment 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  // Deterministic name: redeploying the template updates the same assignment instead of failing
  // with RoleAssignmentExists.
  name: guid(container.id, principalId, roleDefinitionGuid)
  scope: container
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleDefinitionGuid)
    principalId: principalId
    principalType: principalType
    description: assignmentDescription
  }
}

output roleAssignmentId string = assignment.id
