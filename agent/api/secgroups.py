"""/v1/security-groups: create, list, get, replace rules, delete; an instance's groups."""
from flask import Blueprint

from agent import models
from agent.api import parse, path_id, render, route, services

bp = Blueprint("security_groups", __name__)
GROUP = {"name": models.SecurityGroupName}


@route(bp, "POST", "/v1/security-groups", summary="Create a security group {name, rules[]}",
       body=models.SecurityGroupCreate, responses={201: models.SecurityGroup, 404: None, 409: None, 422: None})
def create_group():
    return render(services().secgroups.create(parse(models.SecurityGroupCreate)), 201)


@route(bp, "GET", "/v1/security-groups", summary="List security groups",
       responses={200: models.SecurityGroupList})
def list_groups():
    return render({"security_groups": services().secgroups.list()})


@route(bp, "GET", "/v1/security-groups/{name}", summary="One security group, with its members",
       responses={200: models.SecurityGroup, 404: None}, path_types=GROUP)
def get_group(name):
    return render(services().secgroups.get(models.check(models.SecurityGroupName, name, "group name")))


@route(bp, "PUT", "/v1/security-groups/{name}", summary="Replace a group's rules (live on its members)",
       body=models.SecurityGroupRules, responses={200: models.SecurityGroup, 404: None, 422: None},
       path_types=GROUP)
def replace_rules(name):
    name = models.check(models.SecurityGroupName, name, "group name")
    return render(services().secgroups.replace_rules(name, parse(models.SecurityGroupRules)))


@route(bp, "DELETE", "/v1/security-groups/{name}", summary="Delete a group (409 while an instance uses it)",
       responses={200: models.Deleted, 404: None, 409: None}, path_types=GROUP)
def delete_group(name):
    return render({"deleted": services().secgroups.delete(models.check(models.SecurityGroupName, name,
                                                                       "group name"))})


@route(bp, "GET", "/v1/instances/{id}/security-groups", summary="An instance's security groups",
       responses={200: models.InstanceSecurityGroups, 404: None})
def instance_groups(id):
    inst = services().instances.get(path_id(id))
    return render({"security_groups": services().secgroups.of_instance(inst.id)})


@route(bp, "PUT", "/v1/instances/{id}/security-groups", summary="Set an instance's security groups (live)",
       body=models.InstanceSecurityGroups, responses={200: models.InstanceSecurityGroups, 404: None, 422: None})
def set_instance_groups(id):
    iid = path_id(id)
    return render(services().secgroups.set_instance_groups(iid, parse(models.InstanceSecurityGroups)))
